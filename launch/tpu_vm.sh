#!/usr/bin/env bash
# Train mgjax on a Cloud TPU VM: one host (v5litepod-8) or a pod slice (v4-32, v5p-64),
# with the workdir on Cloud Storage. See launch/README.md.
set -euo pipefail

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE [OPTIONS] [-- MAIN_ARGS...]

Train mgjax on a Cloud TPU VM, single host or pod slice. Every command prints the
gcloud commands it runs; with --dry-run it prints them and runs nothing.

Commands:
  create   create the TPU VM (--accelerator-type; --spot for a spot TPU)
  setup    install mgjax, jax[tpu] and the gs:// libraries on every worker
  run      start `python -m mgjax.main --config=... --workdir=gs://... --distributed`
           on every worker at once, in the background (nohup), logging to
           ~/mgjax-logs/run.log on each worker, so a dropped ssh does not stop it
  logs     follow the log of worker 0 (or --worker=N)
  stop     send SIGTERM to the training on every worker (it checkpoints, then exits)
  watch    keep a run going on a spot TPU: start it, and whenever the TPU is
           preempted or deleted, recreate it, set it up and run the same command
           again (the trainer resumes from the latest checkpoint in the workdir);
           ends when the run ends on a live TPU. Takes create's, setup's and run's options
  delete   delete the TPU VM

Options:
  --name=NAME              the TPU VM's name (every command)
  --zone=ZONE              its zone, e.g. us-central2-b (every command)
  --project=PROJECT        default: gcloud's configured project
  --accelerator-type=TYPE  create, watch: e.g. v5litepod-8, v4-32, v5p-64, v6e-8
  --version=RUNTIME        create, watch: the TPU software version; default by type:
                           v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                   create, watch: a spot TPU (cheaper; may be preempted)
  --git-url=URL            setup, watch: clone URL on the workers instead of copying
                           this checkout (needs a repository the workers can reach)
  --git-ref=REF            setup, watch: the commit, branch or tag to use (default:
                           HEAD of this checkout; with --git-url, the default branch)
  --config=FILE[:ARG]      run, watch: e.g. configs/stage2.py (relative to the repo)
  --workdir=gs://B/PATH    run, watch: checkpoints, metrics and TensorBoard go there
  --worker=N               logs: which worker's log (default 0)
  --interval=SECONDS       watch: time between two looks at the TPU (default 120)
  --dry-run                print the commands (watch: one recreate cycle), run nothing
  -h, --help               this help
  -- MAIN_ARGS...          run, watch: more flags for mgjax.main, e.g.
                           -- --config.init_from=gs://B/stage1 --config.train.steps=5000

Example (a spot v4-32 slice; stage 2 from a stage-1 workdir on the same bucket):
  launch/tpu_vm.sh watch --name=mgjax --zone=us-central2-b --accelerator-type=v4-32 --spot \
    --config=configs/stage2.py --workdir=gs://my-bucket/stage2 \
    -- --config.init_from=gs://my-bucket/stage1
EOF
}

# Paths on the workers (the remote shell expands ~).
readonly REMOTE_TARBALL=mgjax-src.tar.gz  # relative: scp puts it in the home directory
readonly REMOTE_PYTHON=python3.11         # setup.cfg: python_requires >= 3.11

command=""
name="" zone="" project="" accelerator_type="" version="" spot=0
git_url="" git_ref="" config="" workdir="" worker=0 interval=120 jax_version=""
main_args=()

set_option() {  # OPTION VALUE
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --accelerator-type) accelerator_type=$2 ;;
    --version) version=$2 ;;
    --git-url) git_url=$2 ;;
    --git-ref) git_ref=$2 ;;
    --config) config=$2 ;;
    --workdir) workdir=$2 ;;
    --worker) worker=$2 ;;
    --interval) interval=$2 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}

default_runtime_version() {  # ACCELERATOR_TYPE -> the TPU software version Google lists for it
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

validate() {
  [[ -n $command ]] || die "no command given; one of: create setup run logs stop watch delete (see --help)"
  case $command in
    create | setup | run | logs | stop | watch | delete) ;;
    *) die "unknown command '$command'; one of: create setup run logs stop watch delete" ;;
  esac
  [[ -n $name ]] || die "$command needs --name=NAME (the TPU VM's name)"
  [[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=$name: use lowercase letters, digits and hyphens, starting with a letter"
  [[ -n $zone ]] || die "$command needs --zone=ZONE, e.g. --zone=us-central2-b"
  if [[ $command == create || $command == watch ]]; then
    [[ -n $accelerator_type ]] || die "$command needs --accelerator-type=TYPE, e.g. v5litepod-8 or v4-32"
    if [[ -z $version ]]; then
      version=$(default_runtime_version "$accelerator_type") ||
        die "no default runtime for --accelerator-type=$accelerator_type: pass --version=RUNTIME"
    fi
  fi
  if [[ $command == setup || $command == watch ]]; then
    jax_version=$(pinned_jax_version)
    if [[ -z $git_url ]]; then
      git_ref=${git_ref:-HEAD}
      warn_if_dirty "$git_ref" "setup copies commit $git_ref to the workers"
    fi
  fi
  if [[ $command == run || $command == watch ]]; then
    require_gs_workdir "$command" "$workdir"
    if [[ -z $git_url ]]; then
      require_config_file "$command" "$config"
    else
      [[ -n $config ]] || die "$command needs --config=FILE, e.g. --config=configs/stage2.py"
    fi
  fi
  [[ $worker =~ ^[0-9]+$ ]] || die "--worker=$worker: a worker number, 0 for the first"
  [[ $interval =~ ^[0-9]+$ ]] || die "--interval=$interval: a number of seconds"
  if ((${#main_args[@]})) && [[ $command != run && $command != watch ]]; then
    die "$command takes no mgjax.main flags (only run and watch do)"
  fi
}

# ---------------------------------------------------------------------------------------
# The gcloud commands

tpu() {  # gcloud compute tpus tpu-vm VERB NAME --zone=Z ARGS... [--project=P]
  local verb=$1
  shift
  execute gcloud compute tpus tpu-vm "$verb" "$name" --zone="$zone" "$@" ${project:+"--project=$project"}
}

ssh_workers() {  # WORKER SCRIPT: run a shell command line on one worker or on all of them
  tpu ssh --worker="$1" --command="$2"
}

create() {
  local spot_flag=()
  ((spot)) && spot_flag=(--spot)
  tpu create --accelerator-type="$accelerator_type" --version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
}

delete() {
  tpu delete --quiet
}

setup() {
  # Each step returns on failure by itself: watch calls setup where bash's set -e is off.
  local fetch archive
  if [[ -n $git_url ]]; then
    fetch="rm -rf ~/mgjax && git clone --quiet $(shell_quote "$git_url") ~/mgjax"
    [[ -z $git_ref ]] || fetch+=" && git -C ~/mgjax checkout --quiet $(shell_quote "$git_ref")"
  else
    # The commit, not the work tree: what runs is a commit you can name.
    archive="${TMPDIR:-/tmp}/mgjax-$name.tar.gz"
    execute git -C "$REPO_ROOT" archive --format=tar.gz --output="$archive" "$git_ref" || return
    execute gcloud compute tpus tpu-vm scp "$archive" "$name:$REMOTE_TARBALL" --zone="$zone" --worker=all \
      ${project:+"--project=$project"} || return
    fetch="rm -rf ~/mgjax && mkdir -p ~/mgjax && tar -xzf ~/$REMOTE_TARBALL -C ~/mgjax && rm ~/$REMOTE_TARBALL"
  fi
  # One line: it travels as ssh's --command. TPU VM images ship an older python3, so
  # python3.11 comes from apt when missing; everything else lives in ~/mgjax-venv.
  ssh_workers all "set -eu; \
if ! $REMOTE_PYTHON -c \"import ensurepip\" >/dev/null 2>&1; then \
sudo apt-get -qq -o DPkg::Lock::Timeout=600 update && \
sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y $REMOTE_PYTHON $REMOTE_PYTHON-venv; fi; \
$fetch; \
$REMOTE_PYTHON -m venv ~/mgjax-venv; \
~/mgjax-venv/bin/pip install -q --upgrade pip; \
~/mgjax-venv/bin/pip install -q -e \"\$HOME/mgjax[gcs]\" \"jax[tpu]==$jax_version\"; \
~/mgjax-venv/bin/python -c \"import mgjax, jax, gcsfs\"; \
echo \"\$(hostname): mgjax installed in ~/mgjax, python in ~/mgjax-venv\""
}

# "running" when the worker's recorded training process is alive, else "stopped".
# shellcheck disable=SC2016  # expanded by the worker's shell
readonly STATUS_SCRIPT='if [ -f ~/mgjax-logs/run.pid ] && kill -0 "$(cat ~/mgjax-logs/run.pid)" 2>/dev/null; then echo running; else echo stopped; fi'

run() {
  local main=(--config="$config" --workdir="$workdir" --distributed ${main_args[@]+"${main_args[@]}"})
  # --distributed: jax.distributed.initialize() finds the other hosts of a pod slice from
  # the TPU metadata; on a single host it is a no-op. The pid file keeps a second `run` (or
  # watch) from starting another trainer on TPUs that one already holds.
  ssh_workers all "set -eu; \
[ -d ~/mgjax ] || { echo \"\$(hostname): ~/mgjax is missing: run launch/tpu_vm.sh setup first\" >&2; exit 1; }; \
mkdir -p ~/mgjax-logs; \
if [ -f ~/mgjax-logs/run.pid ] && kill -0 \"\$(cat ~/mgjax-logs/run.pid)\" 2>/dev/null; then \
echo \"\$(hostname): mgjax is already running (pid \$(cat ~/mgjax-logs/run.pid)); stop it first: launch/tpu_vm.sh stop\" >&2; exit 1; fi; \
cd ~/mgjax; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start\" >> ~/mgjax-logs/run.log; \
PYTHONUNBUFFERED=1 nohup ~/mgjax-venv/bin/python -m mgjax.main $(quote_command "${main[@]}") \
>> ~/mgjax-logs/run.log 2>&1 < /dev/null & \
echo \$! > ~/mgjax-logs/run.pid; \
echo \"\$(hostname): started mgjax (pid \$!), log: ~/mgjax-logs/run.log\""
}

logs() {
  ssh_workers "$worker" "tail -n 200 -F ~/mgjax-logs/run.log"
}

stop() {
  ssh_workers all "if [ -f ~/mgjax-logs/run.pid ] && kill -0 \"\$(cat ~/mgjax-logs/run.pid)\" 2>/dev/null; then \
kill -TERM \"\$(cat ~/mgjax-logs/run.pid)\" && echo \"\$(hostname): sent SIGTERM to mgjax (pid \$(cat ~/mgjax-logs/run.pid))\"; \
else echo \"\$(hostname): mgjax is not running\"; fi"
}

# ---------------------------------------------------------------------------------------
# watch: the preemption loop

tpu_state() {  # prints READY, PREEMPTED, ... or NOT_FOUND; fails on any other error
  local state err rc=0
  err=$(mktemp)
  state=$(tpu describe --format='value(state)' 2>"$err") || rc=$?
  if ((rc)); then
    if grep -qiE 'NOT_FOUND|not found' "$err"; then
      state=NOT_FOUND
    else
      cat "$err" >&2
      rm -f "$err"
      return 1
    fi
  fi
  rm -f "$err"
  printf '%s\n' "${state:-NOT_FOUND}"
}

training_state() {  # running | stopped | unknown (worker 0 did not answer)
  local out
  out=$(ssh_workers 0 "$STATUS_SCRIPT" 2>/dev/null) || { echo unknown; return; }
  case $out in
    *running*) echo running ;;
    *stopped*) echo stopped ;;
    *) echo unknown ;;
  esac
}

watch_dry_run() {  # what one recreate cycle runs
  tpu describe --format='value(state)'
  delete
  create
  setup
  run
}

watch() {
  # fresh: the TPU was just created and needs setup. started: the run was seen running
  # on this TPU, so seeing it stopped (twice, an interval apart, with the TPU still READY:
  # not a preemption in progress) means it ended.
  local state fresh=0 started=0 stopped_seen=0
  while true; do
    if ! state=$(tpu_state); then
      note "could not read the TPU's state; trying again in ${interval}s"
      sleep "$interval"
      continue
    fi
    case $state in
      NOT_FOUND | PREEMPTED | TERMINATED)
        note "TPU $name is $state: recreating it"
        if [[ $state != NOT_FOUND ]] && ! delete; then
          note "delete failed; trying again in ${interval}s"
        elif create; then
          fresh=1 started=0 stopped_seen=0
          continue
        else
          note "create failed (no capacity?); trying again in ${interval}s"
        fi
        ;;
      READY)
        if ((fresh)); then
          setup || { watch_failed "setup"; continue; }
          fresh=0
        fi
        case $(training_state) in
          running) started=1 stopped_seen=0 ;;
          stopped)
            if ((!started)); then
              run || { watch_failed "run"; continue; }
              started=1
            elif ((stopped_seen)); then
              note "the run on $name has ended (finished, stopped or failed); read the log with:" \
                "launch/tpu_vm.sh logs --name=$name --zone=$zone${project:+ --project=$project}"
              return 0
            else
              stopped_seen=1
            fi
            ;;
          unknown) note "worker 0 did not answer; looking again in ${interval}s" ;;
        esac
        ;;
      STOPPED)
        die "TPU $name was stopped by someone; start or delete it, then watch again"
        ;;
      *) note "TPU $name is $state; waiting" ;;
    esac
    sleep "$interval"
  done
}

watch_failed() {  # STEP: a failure during a preemption is expected; on a READY TPU it is not
  local state
  state=$(tpu_state) || state=unknown
  [[ $state != READY ]] || die "$1 failed on TPU $name, which is READY: fix the cause and watch again"
  note "$1 failed while TPU $name is $state; carrying on"
}

# ---------------------------------------------------------------------------------------

main() {
  parse_args "$@"
  validate
  case $command in
    watch) if ((DRY_RUN)); then watch_dry_run; else watch; fi ;;
    *) "$command" ;;
  esac
}

main "$@"
