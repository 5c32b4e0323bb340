"""Process settings of the entry points: the glibc malloc tunable a training process restarts with."""

import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from mgjax import runtime

GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never\n"


def test_hugetlb_is_added_to_whatever_tunables_the_user_set():
  assert runtime.malloc_tunables({}, MADVISE, GLIBC) == "glibc.malloc.hugetlb=1"
  assert (runtime.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE,
                                  GLIBC) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize(
    "environ, thp_mode, libc",
    [
        ({
            "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"
        }, MADVISE, GLIBC),  # the user's own choice wins
        ({
            "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"
        }, MADVISE, GLIBC),  # already restarted: no loop
        ({}, "[always] madvise never\n", GLIBC),  # every mapping gets huge pages already
        ({}, "always madvise [never]\n", GLIBC),  # none can
        ({}, MADVISE, ("glibc", "2.34")),  # before the tunable existed
        ({}, MADVISE, ("", "")),  # musl and others
        ({}, MADVISE, ("glibc", "")),  # a version that could not be read
    ])
def test_no_restart_where_the_tunable_cannot_help_or_the_user_chose(environ, thp_mode, libc):
  assert runtime.malloc_tunables(environ, thp_mode, libc) is None


@pytest.mark.parametrize("user_setting", [None, "glibc.malloc.hugetlb=0"])
def test_train_entry_point_restarts_once_with_the_tunable(tmp_path, user_setting):
  # The config file is read while flags are parsed, after the restart: it records the
  # environment the process that trains would see. The empty workdir then stops main() before
  # any training. A restart loop would never get there and time out.
  seen = tmp_path / "seen.txt"
  config = tmp_path / "config.py"
  config.write_text(
      textwrap.dedent(f"""
      import os
      import ml_collections

      def get_config():
        with open({str(seen)!r}, "a") as f:
          f.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
        return ml_collections.ConfigDict({{"workdir": ""}})
      """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if user_setting:
    env["GLIBC_TUNABLES"] = user_setting
  result = subprocess.run([sys.executable, "-m", "mgjax.main", f"--config={config}"], env=env, capture_output=True,
                          text=True, timeout=120)
  assert "no workdir" in result.stderr, result.stderr[-2000:]
  starts = seen.read_text().splitlines()
  if runtime.malloc_tunables(env, runtime.thp_mode(), platform.libc_ver()) is None or runtime.has_accelerator():
    assert starts == [user_setting or "-"]
    assert "mgjax: restarting" not in result.stderr
  else:
    assert starts == ["glibc.malloc.hugetlb=1"]
    # One line says so, once.
    assert result.stderr.count("mgjax: restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == 1


def test_library_use_never_restarts_the_process():
  # What a notebook or a test does: import an entry point and call into it. A restart would
  # re-run this command from the start and print its line.
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  for entry in ("mgjax.main", "mgjax.recipe"):
    code = f"import os, {entry}, mgjax.train; print(os.environ.get('GLIBC_TUNABLES', '-'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "-" and "mgjax: restarting" not in result.stderr


CLIS = ("mgjax.main", "mgjax.recipe", "mgjax.plan", "mgjax.predict", "mgjax.data.build", "mgjax.convert")


def test_every_cli_help_exits_zero(tmp_path):
  """--help is a success, not an error, for scripts that check it (and from any directory);
  it restarts nothing and says nothing about restarting."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  procs = {
      m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) for m in CLIS
  }
  for module, proc in procs.items():
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{module} --help exited {proc.returncode}:\n{out[-2000:]}"
    assert "usage" in out.lower() or "flags" in out.lower(), out[-500:]
    assert "restarting" not in out and "GLIBC_TUNABLES" not in out, out[:500]


# What a config that fails to load says: (--config value, its file's text or None, the one line).
BAD_CONFIGS = [
    ("configs/nope.py", None, "error: --config: no config file configs/nope.py (a path from the working directory"),
    ("configs/nope.py --config.train.steps=3", None, "error: --config: no config file configs/nope.py"),
    ("configs/stage1.py:data=nope", None, "error: --config=configs/stage1.py:data=nope failed to load "
     "(configs/stage1.py, line 17): no data preset 'nope': "),
    ("{dir}/mine.py", "def get_config(:\n", "error: --config={dir}/mine.py failed to load ({dir}/mine.py, line 1): "
     "SyntaxError: invalid syntax"),
    ("{dir}/mine.py", "def get_config():\n  return {}['train']\n",
     "error: --config={dir}/mine.py failed to load ({dir}/mine.py, line 2): KeyError: 'train'"),
    ("{dir}", None, "error: --config: config file {dir} failed to load: [Errno 21] Is a directory"),
]


def test_a_config_that_fails_to_load_is_one_line_naming_the_file(tmp_path):
  """A missing config file or preset, or a config file that fails while it runs: one line on
  stderr, naming the file and line, exit status 1; never a traceback through absl's flags."""
  env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # one process: no restart line
  procs = []
  for i, (value, text, expected) in enumerate(BAD_CONFIGS):
    folder = tmp_path / str(i)
    folder.mkdir()
    if text is not None:
      (folder / "mine.py").write_text(text)
    config, *overrides = value.format(dir=folder).split()
    for module in ("mgjax.main", "mgjax.data.build"):
      procs.append((module, expected.format(dir=folder),
                    subprocess.Popen([sys.executable, "-m", module, f"--config={config}", *overrides], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  for module, expected, proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (module, proc.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith(expected), (module, expected, err[-2000:])


def test_no_tpu_errors_from_a_cpu_host(tmp_path):
  """libtpu (the test and tpu extras) prints errors about TPU_ACCELERATOR_TYPE and
  TPU_WORKER_HOSTNAMES wherever JAX tries the TPU on a host without one; the entry points keep
  JAX to the CPU there, unless JAX_PLATFORMS says otherwise."""
  if runtime.has_accelerator():
    pytest.skip("this host has a TPU or GPU: JAX is left to use it")
  pytest.importorskip("libtpu")
  # A config that starts JAX's backends while the entry point parses its flags, and records
  # the platform JAX chose: what any command does later, after its flags.
  config = tmp_path / "config.py"
  config.write_text(
      textwrap.dedent(f"""
      import jax
      import ml_collections

      def get_config():
        with open({str(tmp_path / 'platform.txt')!r}, "w") as f:
          f.write(jax.devices()[0].platform)
        return ml_collections.ConfigDict({{"workdir": ""}})
      """))
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "GLIBC_TUNABLES")}
  env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
  entry = subprocess.run([sys.executable, "-m", "mgjax.main", f"--config={config}"], env=env, capture_output=True,
                         text=True, timeout=120)
  assert "no workdir" in entry.stderr, entry.stderr[-2000:]
  assert "TPU_ACCELERATOR_TYPE" not in entry.stderr and "TPU_WORKER_HOSTNAMES" not in entry.stderr, entry.stderr
  assert (tmp_path / "platform.txt").read_text() == "cpu"
  # What it quiets: the same JAX start from a plain script, which mgjax leaves alone.
  plain = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"], env=env,
                         capture_output=True, text=True, timeout=120)
  assert plain.stdout.strip() == "cpu" and "TPU_ACCELERATOR_TYPE" in plain.stderr, plain.stderr[-2000:]
  # A user's JAX_PLATFORMS wins, even empty (JAX's "every platform").
  chosen = subprocess.run([
      sys.executable, "-c", "import os; from mgjax import runtime; runtime.cpu_only_without_accelerator(); "
      "print(repr(os.environ['JAX_PLATFORMS']))"
  ], env={
      **env, "JAX_PLATFORMS": ""
  }, capture_output=True, text=True, timeout=120)
  assert chosen.stdout.strip() == "''", chosen.stderr[-2000:]


def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  from mgjax import config_files

  repo = os.path.dirname(config_files.CONFIGS_DIR)
  monkeypatch.chdir(tmp_path)
  argv = ["prog", "--config=configs/stage2.py:model=sample", "--config.train.steps=3", "--workdir=w"]
  resolved = runtime.resolve_config_paths(argv)
  assert resolved[1] == f"--config={os.path.join(repo, 'configs', 'stage2.py')}:model=sample"
  assert resolved[2:] == argv[2:]
  # A file where the command runs wins over the repository's.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "stage2.py").write_text("")
  assert runtime.resolve_config_paths(argv) == argv


def test_a_data_config_of_your_own_from_anywhere_on_disk(tmp_path):
  from mgjax import config_files

  mine = tmp_path / "elsewhere" / "my_mix.py"
  mine.parent.mkdir()
  text = open(os.path.join(config_files.CONFIGS_DIR, "data", "sample.py")).read()
  mine.write_text(text.replace('c.name = "sample"', 'c.name = "my_mix"'))
  c = config_files.load_config_file(os.path.join(config_files.CONFIGS_DIR, "stage1.py"), f"data={mine}:tiny")
  assert c.data.recipe.name == "sample_tiny"  # its own :tiny preset applied
  c = config_files.load_config_file(os.path.join(config_files.CONFIGS_DIR, "stage1.py"), f"data={mine}")
  assert c.data.recipe.name == "my_mix"
  with pytest.raises(ValueError, match="my_other_mix.py does not exist"):
    config_files.load_config_file(os.path.join(config_files.CONFIGS_DIR, "stage1.py"), "data=my_other_mix.py")


def test_an_installed_package_finds_its_configs_from_any_directory(tmp_path):
  # A wheel installed into a prefix of its own (as a venv or `pip install --user` would), run
  # from a directory with no checkout in sight. --ignore-installed: pip would otherwise
  # uninstall the environment's own (editable) mgjax first. Built from a copy of what the
  # wheel is made of: an in-place build would leave build/ and egg-info in the checkout.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  source = tmp_path / "source"
  source.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(repo, name), source / name)
  for name in ("mgjax", "configs"):
    shutil.copytree(os.path.join(repo, name), source / name, ignore=shutil.ignore_patterns("__pycache__"))
  build = subprocess.run([
      sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
      str(source), "-w",
      str(tmp_path / "wheel")
  ], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert build.returncode == 0, build.stderr[-2000:]
  wheel = next((tmp_path / "wheel").glob("mgjax-*.whl"))
  prefix = tmp_path / "prefix"
  install = subprocess.run([
      sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", "--prefix",
      str(prefix),
      str(wheel)
  ], capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr[-2000:]
  site = next(prefix.glob("lib/python*/site-packages"))
  code = ("import mgjax, sys; from mgjax import config_files, runtime; print(mgjax.__file__); "
          "print(config_files.CONFIGS_DIR); print(config_files.preset('models', 'mgm_7b').llm.layers); "
          "print(runtime.resolve_config_paths(['p', '--config=configs/stage2.py:model=sample'])[1])")
  env = dict(os.environ, PYTHONPATH=str(site))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                        env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  package, configs, layers, resolved = done.stdout.split()
  assert package.startswith(str(site)) and configs == str(prefix / "share" / "mgjax" / "configs")
  assert layers == "32"
  assert resolved == f"--config={prefix / 'share' / 'mgjax' / 'configs' / 'stage2.py'}:model=sample"
