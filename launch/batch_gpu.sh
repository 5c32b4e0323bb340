#!/usr/bin/env bash
# Train mgjax as a gcloud Batch job on one GPU machine (a2-highgpu-1g, a3-highgpu-8g, ...),
# in the container launch/Dockerfile builds, with the workdir on Cloud Storage.
# See launch/README.md.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/batch_gpu.sh COMMAND --location=REGION [OPTIONS] [-- MAIN_ARGS...]

Train mgjax as a gcloud Batch job on one GPU VM. Every command prints the commands it
runs; with --dry-run it prints them and runs nothing (submit still writes the job
config file, so that you can read it).

Commands:
  build    build the image from launch/Dockerfile out of a commit of this checkout
           (git archive) and push it to Artifact Registry, with Cloud Build (default)
           or a local docker (--builder=docker)
  submit   submit a job that runs `python -m mgjax.main --config=... --workdir=gs://...`
           in that image; preempted spot VMs are retried (--max-retries) and the
           trainer resumes from the latest checkpoint in the workdir
  status   print the job's state (QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED)
  logs     print the job's output (Cloud Logging), oldest first
  delete   delete the job

Options:
  --location=REGION        the Batch region, e.g. us-central1 (every command but build);
                           also the default image's Artifact Registry region
  --project=PROJECT        default: gcloud's configured project
  --image=URI              default: REGION-docker.pkg.dev/PROJECT/mgjax/mgjax:latest
                           (needs --project and --location)
  --builder=cloudbuild|docker  build: where the image is built (default cloudbuild)
  --git-ref=REF            build: the commit to build (default HEAD)
  --name=JOB               submit, status, logs, delete: the job's name
  --machine-type=TYPE      submit: default a2-highgpu-1g
  --gpu-type=TYPE          submit: default from the machine type (a2-highgpu nvidia-tesla-a100,
  --gpu-count=N              a2-ultragpu nvidia-a100-80gb, a3-highgpu nvidia-h100-80gb, ...;
                             the count is the machine type's NNg)
  --spot                   submit: a spot VM (cheaper; preempted ones are retried)
  --max-retries=N          submit: how often a preempted task restarts (default 3, at most 10)
  --config=FILE[:ARG]      submit: e.g. configs/stage2.py (relative to the repo)
  --workdir=gs://B/PATH    submit: checkpoints, metrics and TensorBoard go there
  --job-template=FILE      submit: the job config to fill in (default launch/batch_job.json)
  --job-file=FILE          submit: where the filled-in job config goes
                           (default ${TMPDIR:-/tmp}/mgjax-batch-JOB.json)
  --since=DURATION         logs: how far back, e.g. 1h, 2d (default 1d)
  --dry-run                print the commands, run nothing
  -h, --help               this help
  -- MAIN_ARGS...          submit: more flags for mgjax.main, e.g.
                           -- --config.init_from=gs://B/stage1 --config.train.steps=5000

Example:
  launch/batch_gpu.sh build --project=my-project --location=us-central1
  launch/batch_gpu.sh submit --project=my-project --location=us-central1 --name=stage2 \
    --machine-type=a3-highgpu-8g --spot --config=configs/stage2.py \
    --workdir=gs://my-bucket/stage2 -- --config.init_from=gs://my-bucket/stage1
EOF
}

command=""
location="" project="" image="" builder=cloudbuild git_ref=HEAD name=""
machine_type=a2-highgpu-1g gpu_type="" gpu_count="" spot=0 max_retries=3
config="" workdir="" job_template="$REPO_ROOT/launch/batch_job.json" job_file="" since=1d
main_args=()

set_option() {  # OPTION VALUE
  case $1 in
    --location) location=$2 ;;
    --project) project=$2 ;;
    --image) image=$2 ;;
    --builder) builder=$2 ;;
    --git-ref) git_ref=$2 ;;
    --name) name=$2 ;;
    --machine-type) machine_type=$2 ;;
    --gpu-type) gpu_type=$2 ;;
    --gpu-count) gpu_count=$2 ;;
    --max-retries) max_retries=$2 ;;
    --config) config=$2 ;;
    --workdir) workdir=$2 ;;
    --job-template) job_template=$2 ;;
    --job-file) job_file=$2 ;;
    --since) since=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

default_gpus() {  # MACHINE_TYPE -> "GPU_TYPE COUNT" for the machine types that come with GPUs
  local count
  case $1 in
    a2-highgpu-*g | a2-megagpu-*g | a2-ultragpu-*g | a3-highgpu-*g | a3-megagpu-*g | a3-ultragpu-*g)
      count=${1##*-}
      count=${count%g} ;;
    *) return 1 ;;
  esac
  [[ $count =~ ^[0-9]+$ ]] || return 1
  case $1 in
    a2-ultragpu-*) echo "nvidia-a100-80gb $count" ;;
    a2-*) echo "nvidia-tesla-a100 $count" ;;
    a3-highgpu-*) echo "nvidia-h100-80gb $count" ;;
    a3-megagpu-*) echo "nvidia-h100-mega-80gb $count" ;;
    a3-ultragpu-*) echo "nvidia-h200-141gb $count" ;;
  esac
}

validate() {
  local gpus
  [[ -n $command ]] || die "no command given; one of: build submit status logs delete (see --help)"
  case $command in
    build | submit | status | logs | delete) ;;
    *) die "unknown command '$command'; one of: build submit status logs delete" ;;
  esac
  if [[ $command != build ]]; then
    [[ -n $location ]] || die "$command needs --location=REGION, e.g. --location=us-central1"
    [[ -n $name ]] || die "$command needs --name=JOB (the Batch job's name)"
    [[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
      die "--name=$name: Batch job names are lowercase letters, digits and hyphens, starting with a letter (at most 63)"
  fi
  if [[ $command == build || $command == submit ]]; then
    if [[ -z $image ]]; then
      [[ -n $project && -n $location ]] ||
        die "$command needs --image=URI, or --project and --location for the default" \
          "REGION-docker.pkg.dev/PROJECT/mgjax/mgjax:latest"
      image="$location-docker.pkg.dev/$project/mgjax/mgjax:latest"
    fi
  fi
  if [[ $command == build ]]; then
    [[ $builder == cloudbuild || $builder == docker ]] || die "--builder=$builder: cloudbuild or docker"
    warn_if_dirty "$git_ref" "the image is built from commit $git_ref"
  fi
  if [[ $command == submit ]]; then
    require_gs_workdir submit "$workdir"
    require_config_file submit "$config"
    if [[ -z $gpu_type || -z $gpu_count ]]; then
      gpus=$(default_gpus "$machine_type") ||
        die "no default GPUs for --machine-type=$machine_type: pass --gpu-type and --gpu-count" \
          "(e.g. n1-standard-8 with --gpu-type=nvidia-tesla-t4 --gpu-count=1)"
      gpu_type=${gpu_type:-${gpus% *}}
      gpu_count=${gpu_count:-${gpus#* }}
    fi
    [[ $gpu_count =~ ^[1-9][0-9]*$ ]] || die "--gpu-count=$gpu_count: a positive number"
    if ! [[ $max_retries =~ ^[0-9]+$ ]] || ((max_retries > 10)); then
      die "--max-retries=$max_retries: 0 to 10"
    fi
    [[ -f $job_template ]] || die "--job-template=$job_template: no such file"
    job_file=${job_file:-${TMPDIR:-/tmp}/mgjax-batch-$name.json}
  fi
  if ((${#main_args[@]})) && [[ $command != submit ]]; then
    die "$command takes no mgjax.main flags (only submit does)"
  fi
}


# ---------------------------------------------------------------------------------------

build() {
  local jax_version archive
  jax_version=$(pinned_jax_version)
  # A commit, not the work tree: the image holds exactly what `git show REF` shows, and
  # nothing git ignores (.venv, data/, runs/) is uploaded. .tgz: a suffix Cloud Build takes.
  archive="${TMPDIR:-/tmp}/mgjax-src.tgz"
  execute git -C "$REPO_ROOT" archive --format=tar.gz --output="$archive" "$git_ref"
  if [[ $builder == cloudbuild ]]; then
    execute gcloud builds submit "$archive" --config="$REPO_ROOT/launch/cloudbuild.yaml" \
      --substitutions="_IMAGE=$image,_JAX_VERSION=$jax_version" ${project:+"--project=$project"}
  else
    execute_stdin "$archive" docker build -f launch/Dockerfile --build-arg "JAX_VERSION=$jax_version" -t "$image" -
    execute docker push "$image"
  fi
}

write_job_config() {  # fills in the template with python's json: quoting done right
  command -v python3 >/dev/null || die "submit needs python3 to write the job config"
  local provisioning=STANDARD
  ((spot)) && provisioning=SPOT
  python3 - "$job_template" "$job_file" \
    "IMAGE=$image" "MACHINE_TYPE=$machine_type" "PROVISIONING_MODEL=$provisioning" \
    "GPU_TYPE=$gpu_type" "GPU_COUNT=$gpu_count" "MAX_RETRIES=$max_retries" "BOOT_DISK_GB=100" \
    -- python -m mgjax.main "--config=$config" "--workdir=$workdir" ${main_args[@]+"${main_args[@]}"} <<'PYTHON'
import json, re, sys

template, out, *rest = sys.argv[1:]
split = rest.index("--")
values = dict(item.split("=", 1) for item in rest[:split])
values["COMMAND"] = rest[split + 1:]
for key in ("GPU_COUNT", "MAX_RETRIES", "BOOT_DISK_GB"):
  values[key] = int(values[key])

def fill(node):
  if isinstance(node, dict):
    return {k: fill(v) for k, v in node.items()}
  if isinstance(node, list):
    return [fill(v) for v in node]
  if isinstance(node, str):
    whole = re.fullmatch(r"\$\{(\w+)\}", node)
    if whole:  # the whole string: the value keeps its type (a number, the command list)
      return values[whole.group(1)]
    return re.sub(r"\$\{(\w+)\}", lambda m: str(values[m.group(1)]), node)
  return node

with open(template) as f:
  try:
    job = fill(json.load(f))
  except KeyError as e:
    sys.exit(f"{template}: unknown placeholder ${{{e.args[0]}}}; known: {sorted(values)}")
with open(out, "w") as f:
  json.dump(job, f, indent=2)
  f.write("\n")
PYTHON
  note "job config written to $job_file"
}

submit() {
  write_job_config
  batch_jobs submit --config="$job_file"
}

batch_jobs() {  # gcloud batch jobs VERB NAME --location=R ARGS... [--project=P]
  local verb=$1
  shift
  execute gcloud batch jobs "$verb" "$name" --location="$location" "$@" ${project:+"--project=$project"}
}

status() {
  batch_jobs describe --format='value(status.state)'
}

logs() {
  local read_args=(--freshness="$since" --order=asc --format='value(textPayload)' ${project:+"--project=$project"})
  if ((DRY_RUN)); then  # the job's uid is only known by asking: show it as a shell variable
    # shellcheck disable=SC2016  # $(...) and $JOB_UID are for the shell the lines are pasted into
    printf 'JOB_UID=$(%s)\n' "$(quote_command gcloud batch jobs describe "$name" --location="$location" \
      --format='value(uid)' ${project:+"--project=$project"})"
    # shellcheck disable=SC2016
    printf 'gcloud logging read "log_id(\\"batch_task_logs\\") AND labels.job_uid=\\"$JOB_UID\\"" %s\n' \
      "$(quote_command "${read_args[@]}")"
    return
  fi
  local uid
  uid=$(batch_jobs describe --format='value(uid)')
  [[ -n $uid ]] || die "job $name in $location has no uid (not found?)"
  execute gcloud logging read "log_id(\"batch_task_logs\") AND labels.job_uid=\"$uid\"" "${read_args[@]}"
}

delete() {
  batch_jobs delete --quiet
}

main() {
  parse_args "$@"
  validate
  "$command"
}

main "$@"
