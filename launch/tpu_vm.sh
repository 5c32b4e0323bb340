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
  create   request the TPU VM as a queued resource (--accelerator-type; --spot for
           a spot TPU, --flex-start=DURATION for flex-start) and wait until it is
           ACTIVE: the request waits in Google's queue for capacity, no retrying
  setup    install mgjax, jax[tpu] and the gs:// libraries on every worker; with
           --mount=BUCKET also mount gs://BUCKET at /mnt/BUCKET on every worker (gcsfuse)
  run      start `python -m mgjax.main --config=... --workdir=gs://... --distributed`
           on every worker at once, in the background (nohup), logging to
           ~/mgjax-logs/run.log on each worker, so a dropped ssh does not stop it;
           with --then-config, the next stage starts when this one has finished
  logs     follow the log of worker 0 (or --worker=N)
  stop     send SIGTERM to the training on every worker (it checkpoints, then exits)
  watch    keep a run going on a spot TPU: start it, and whenever the TPU is
           preempted or deleted, recreate it, set it up and run the same command
           again (the trainer resumes from the latest checkpoint in the workdir);
           ends when the run ends on a live TPU: exit status 0 if it finished, 1 if
           it failed. Takes create's, setup's and run's options
  delete   delete the TPU VM and its queued resource

Options:
  --name=NAME              the TPU VM's name (every command)
  --zone=ZONE              its zone, e.g. us-central2-b (every command)
  --project=PROJECT        default: gcloud's configured project
  --accelerator-type=TYPE  create, watch: e.g. v5litepod-8, v4-32, v5p-64, v6e-8
  --version=RUNTIME        create, watch: the TPU software version; default by type:
                           v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                           v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                   create, watch: a spot TPU (cheaper; may be preempted)
  --flex-start=DURATION    create, watch: a flex-start TPU (Dynamic Workload Scheduler) that
                           runs for at most DURATION (e.g. 24h; up to 7d); only some zones
                           offer it, e.g. v6e in us-east5-a, v5e (training) in us-west4-a
  --git-url=URL            setup, watch: clone URL on the workers instead of copying
                           this checkout (needs a repository the workers can reach)
  --git-ref=REF            setup, watch: the commit, branch or tag to use (default:
                           HEAD of this checkout; with --git-url, the default branch)
  --mount=BUCKET           setup, watch: mount gs://BUCKET at /mnt/BUCKET on every worker
                           with Cloud Storage FUSE, for a dataset every worker reads:
                           -- --config.data.data_dir=/mnt/BUCKET/data
  --config=FILE[:ARG]      run, watch: e.g. configs/stage2.py (relative to the repo); a
                           config file or a data=FILE.py outside the repo, e.g.
                           configs/stage1.py:data=$HOME/my_mix.py, is copied to the
                           workers with the job (to ~/mgjax-user/)
  --workdir=gs://B/PATH    run, watch: checkpoints, metrics and TensorBoard go there
  --then-config=FILE[:ARG] run, watch: a second stage, run once the first has finished,
                           from its result (--config.init_from=the first --workdir)
  --then-workdir=gs://B/P  run, watch: the second stage's workdir
  --worker=N               logs: which worker's log (default 0)
  --interval=SECONDS       watch: time between two looks at the TPU (default 120)
  --dry-run                print the commands (watch: one recreate cycle), run nothing
  -h, --help               this help
  -- MAIN_ARGS...          run, watch: more flags for mgjax.main (for every stage), e.g.
                           -- --config.init_from=gs://B/stage1 --config.train.steps=5000

Example (a spot v5p-16 slice: stage 1 then stage 2, the dataset read from the bucket):
  launch/tpu_vm.sh watch --name=mgjax --zone=us-east5-a --accelerator-type=v5p-16 --spot \
    --mount=my-bucket --config=configs/stage1.py --workdir=gs://my-bucket/stage1 \
    --then-config=configs/stage2.py --then-workdir=gs://my-bucket/stage2 \
    -- --config.data.data_dir=/mnt/my-bucket/data
EOF
}

# Paths on the workers (the remote shell expands ~).
readonly REMOTE_TARBALL=mgjax-src.tar.gz  # relative: scp puts it in the home directory
readonly REMOTE_PYTHON=python3.11         # setup.cfg: python_requires >= 3.11

command=""
name="" zone="" project="" accelerator_type="" version="" spot=0 flex_start=""
git_url="" git_ref="" config="" workdir="" worker=0 interval=120 jax_version=""
mount="" then_config="" then_workdir=""
main_args=()
# Files outside the repository that a config names: run copies them to ~/mgjax-user/ on
# every worker (see carry_configs), and the workers' configs name them there.
carry_files=() remote_config="" remote_then_config=""
readonly REMOTE_USER_DIR=mgjax-user  # in the workers' home, beside ~/mgjax

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
    --mount) mount=$2 ;;
    --then-config) then_config=$2 ;;
    --then-workdir) then_workdir=$2 ;;
    --worker) worker=$2 ;;
    --interval) interval=$2 ;;
    --flex-start) flex_start=$2 ;;
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
    [[ -n $config ]] || die "$command needs --config=FILE, e.g. --config=configs/stage2.py"
    if [[ -n $then_config || -n $then_workdir ]]; then
      [[ -n $then_config && -n $then_workdir ]] || die "--then-config and --then-workdir go together"
      require_gs_workdir "$command" "$then_workdir"
      [[ $then_workdir != "$workdir" ]] || die "--then-workdir must differ from --workdir (each stage has its own)"
    fi
    carry_configs
  else
    [[ -z $then_config && -z $then_workdir ]] || die "$command takes no --then-config/--then-workdir (only run and watch do)"
  fi
  if [[ -n $flex_start ]]; then
    [[ $command == create || $command == watch ]] || die "$command takes no --flex-start (only create and watch do)"
    ((!spot)) || die "--spot and --flex-start are two ways to rent a TPU: pass one"
    [[ $flex_start =~ ^[1-9][0-9]*[mhd]$ ]] ||
      die "--flex-start=$flex_start: how long the TPU may run, e.g. --flex-start=24h (m, h or d; at most 7d)"
  elif ((spot)) && [[ $command != create && $command != watch ]]; then
    die "$command takes no --spot (only create and watch do)"
  fi
  if [[ -n $mount ]]; then
    [[ $command == setup || $command == watch ]] || die "$command takes no --mount (only setup and watch do)"
    [[ $mount =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]] ||
      die "--mount=$mount: the bucket's name alone, e.g. --mount=my-bucket (it is mounted at /mnt/my-bucket)"
  fi
  [[ $worker =~ ^[0-9]+$ ]] || die "--worker=$worker: a worker number, 0 for the first"
  [[ $interval =~ ^[0-9]+$ ]] || die "--interval=$interval: a number of seconds"
  if ((${#main_args[@]})) && [[ $command != run && $command != watch ]]; then
    die "$command takes no mgjax.main flags (only run and watch do)"
  fi
}

# ---------------------------------------------------------------------------------------
# Config files outside the repository travel with the job

carried=""  # carry's answer (a global: carry must not run in a subshell, it adds to carry_files)
carry() {  # PATH: a file in this repository stays as it is; another is copied to the workers
  local path=$1 base
  if [[ $path != /* && -f $REPO_ROOT/$path ]]; then
    carried=$path
    return
  fi
  [[ -f $path ]] || die "$command: no file $path (neither in $REPO_ROOT nor from here)"
  base=$(basename "$path")
  local f
  for f in ${carry_files[@]+"${carry_files[@]}"}; do
    [[ $f == "$path" ]] && { carried="../$REMOTE_USER_DIR/$base"; return; }
    [[ $(basename "$f") != "$base" ]] || die "$command: $f and $path would both be ~/$REMOTE_USER_DIR/$base; rename one"
  done
  carry_files+=("$path")
  carried="../$REMOTE_USER_DIR/$base"  # the trainer runs in ~/mgjax
}

carry_config() {  # FILE[:KEY=VALUE,...] -> carried: the config as the workers name it
  local spec=$1 file arg="" item key value out="" items
  file=${spec%%:*}
  [[ $spec != *:* ]] || arg=${spec#*:}
  carry "$file"
  file=$carried
  if [[ -n $arg ]]; then
    IFS=, read -r -a items <<<"$arg"
    for item in "${items[@]}"; do
      key=${item%%=*}
      value=${item#*=}
      if [[ $item == *=* && ${value%%:*} == *.py ]]; then  # data=FILE.py[:ARG]: a config of your own
        carry "${value%%:*}"
        [[ $value != *:* ]] || carried+=":${value#*:}"
        item="$key=$carried"
      fi
      out+="${out:+,}$item"
    done
    file+=":$out"
  fi
  carried=$file
}

carry_configs() {
  carry_config "$config"
  remote_config=$carried
  if [[ -n $then_config ]]; then
    carry_config "$then_config"
    remote_then_config=$carried
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

# TPUs are requested as queued resources, as Google recommends: the request (named like
# the TPU VM it makes) waits in Google's queue until there is capacity, instead of a create
# that fails when there is none. Flex-start is only in the alpha command group.
queued_resource() {  # VERB ARGS...: gcloud [alpha] compute tpus queued-resources VERB NAME --zone=Z ARGS...
  local verb=$1 alpha=()
  shift
  [[ $verb != create || -z $flex_start ]] || alpha=(alpha)
  execute gcloud ${alpha[@]+"${alpha[@]}"} compute tpus queued-resources "$verb" "$name" --zone="$zone" "$@" \
    ${project:+"--project=$project"}
}

request() {  # queue the request; it turns ACTIVE (the TPU VM exists) when capacity is found
  local tier=()
  ((spot)) && tier=(--spot)
  [[ -z $flex_start ]] || tier=(--provisioning-model=flex-start --max-run-duration="$flex_start")
  queued_resource create --node-id="$name" --accelerator-type="$accelerator_type" --runtime-version="$version" \
    ${tier[@]+"${tier[@]}"}
}

create() {
  request
  ((DRY_RUN)) && { queued_resource describe --format='value(state.state)'; return; }
  note "queued; waiting for the TPU (looking every ${interval}s; Ctrl-C stops waiting, the request stays queued)"
  local state
  while true; do
    state=$(request_state) || state=unknown
    case $state in
      ACTIVE) note "TPU $name is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND)
        die "the request for TPU $name is $state; see why with: gcloud compute tpus queued-resources describe $name --zone=$zone" ;;
    esac
    sleep "$interval"
  done
}

delete() {  # --force: the TPU VM goes with its request
  queued_resource delete --force --quiet
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
  local mount_line=""
  if [[ -n $mount ]]; then
    # Google's gcsfuse install for Debian/Ubuntu, then the bucket at /mnt/BUCKET, owned by the
    # ssh user; --implicit-dirs shows folders made by other tools (gcloud storage, TFDS).
    mount_line="if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && \
sudo apt-get -qq -o DPkg::Lock::Timeout=600 update && \
sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y gcsfuse; fi; \
if ! mountpoint -q /mnt/$mount; then sudo mkdir -p /mnt/$mount && sudo chown \"\$(id -u):\$(id -g)\" /mnt/$mount && \
gcsfuse --implicit-dirs $mount /mnt/$mount; fi; \
echo \"\$(hostname): gs://$mount mounted at /mnt/$mount\"; "
  fi
  ssh_workers all "set -eu; \
${mount_line}if ! $REMOTE_PYTHON -c \"import ensurepip\" >/dev/null 2>&1; then \
sudo apt-get -qq -o DPkg::Lock::Timeout=600 update && \
sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y $REMOTE_PYTHON $REMOTE_PYTHON-venv; fi; \
$fetch; \
$REMOTE_PYTHON -m venv ~/mgjax-venv; \
~/mgjax-venv/bin/pip install -q --upgrade pip; \
~/mgjax-venv/bin/pip install -q -e \"\$HOME/mgjax[gcs]\" \"jax[tpu]==$jax_version\"; \
~/mgjax-venv/bin/python -c \"import mgjax, jax, gcsfs\"; \
echo \"\$(hostname): mgjax installed in ~/mgjax, python in ~/mgjax-venv\""
}

# "running" when the worker's recorded training process is alive, else "stopped STATUS"
# with the run's exit status (0: every stage finished), or "stopped unknown" before it has one.
# shellcheck disable=SC2016  # expanded by the worker's shell
readonly STATUS_SCRIPT='if [ -f ~/mgjax-logs/run.pid ] && kill -0 "$(cat ~/mgjax-logs/run.pid)" 2>/dev/null; then echo running; else echo "stopped $(cat ~/mgjax-logs/run.status 2>/dev/null || echo unknown)"; fi'

stage_line() {  # MAIN_ARGS...: one trainer, in the background under nohup, its pid recorded, waited for
  printf '%s' "{ PYTHONUNBUFFERED=1 nohup ~/mgjax-venv/bin/python -m mgjax.main $(quote_command "$@") \
>> ~/mgjax-logs/run.log 2>&1 < /dev/null & echo \$! > ~/mgjax-logs/run.pid; wait \$!; }"
}

copy_carried() {  # the config files from outside the repository, to ~/mgjax-user/ on every worker
  ((${#carry_files[@]})) || return 0
  ssh_workers all "mkdir -p ~/$REMOTE_USER_DIR" || return
  execute gcloud compute tpus tpu-vm scp "${carry_files[@]}" "$name:$REMOTE_USER_DIR/" --zone="$zone" --worker=all \
    ${project:+"--project=$project"}
}

run() {
  local stages
  # --distributed: jax.distributed.initialize() finds the other hosts of a pod slice from
  # the TPU metadata; on a single host it is a no-op.
  stages=$(stage_line --config="$remote_config" --workdir="$workdir" --distributed ${main_args[@]+"${main_args[@]}"})
  if [[ -n $then_config ]]; then
    # Only after the first stage finished (exit status 0), from its result. Run again after a
    # preemption, a finished first stage returns at once and the second resumes.
    stages+=" && $(stage_line --config="$remote_then_config" --workdir="$then_workdir" --distributed \
      ${main_args[@]+"${main_args[@]}"} --config.init_from="$workdir")"
  fi
  copy_carried || return
  # The pid file (the running stage's trainer) keeps a second `run` (or watch) from starting
  # another trainer on TPUs that one already holds; run.status gets the exit status of the
  # whole run when it ends, for watch. The subshell ignores SIGHUP, as nohup does, so that
  # it outlives the ssh session to write it.
  ssh_workers all "set -eu; \
[ -d ~/mgjax ] || { echo \"\$(hostname): ~/mgjax is missing: run launch/tpu_vm.sh setup first\" >&2; exit 1; }; \
mkdir -p ~/mgjax-logs; \
if [ -f ~/mgjax-logs/run.pid ] && kill -0 \"\$(cat ~/mgjax-logs/run.pid)\" 2>/dev/null; then \
echo \"\$(hostname): mgjax is already running (pid \$(cat ~/mgjax-logs/run.pid)); stop it first: launch/tpu_vm.sh stop\" >&2; exit 1; fi; \
cd ~/mgjax; \
rm -f ~/mgjax-logs/run.status; \
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start\" >> ~/mgjax-logs/run.log; \
( set +e; trap \"\" HUP; $stages; echo \$? > ~/mgjax-logs/run.status ) > /dev/null 2>&1 < /dev/null & \
echo \"\$(hostname): started mgjax, log: ~/mgjax-logs/run.log\""
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

request_state() {  # the queued resource's state: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ... or
  # NOT_FOUND; fails on any other error
  local state err rc=0
  err=$(mktemp)
  state=$(queued_resource describe --format='value(state.state)' 2>"$err") || rc=$?
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

training_state() {  # running | stopped STATUS | unknown (worker 0 did not answer)
  local out
  out=$(ssh_workers 0 "$STATUS_SCRIPT" 2>/dev/null) || { echo unknown; return; }
  case $out in
    *running*) echo running ;;
    *stopped*) echo "stopped ${out##*stopped }" ;;
    *) echo unknown ;;
  esac
}

watch_dry_run() {  # what one recreate cycle runs
  queued_resource describe --format='value(state.state)'
  delete
  request
  setup
  run
}

watch() {
  # fresh: the TPU was just requested and needs setup once ACTIVE. started: the run was
  # seen running on this TPU, so seeing it stopped (twice, an interval apart, with the
  # request still ACTIVE: not a preemption in progress) means it ended.
  local state fresh=0 started=0 stopped_seen=0 training
  while true; do
    if ! state=$(request_state); then
      note "could not read the TPU's state; trying again in ${interval}s"
      sleep "$interval"
      continue
    fi
    case $state in
      # SUSPENDED: a spot TPU was preempted (or a flex-start one reached its duration);
      # FAILED: the request could not be met. Either way: delete it and queue a new one.
      NOT_FOUND | SUSPENDED | FAILED)
        note "TPU $name is $state: requesting it again"
        if [[ $state != NOT_FOUND ]] && ! delete; then
          note "delete failed; trying again in ${interval}s"
        elif request; then
          fresh=1 started=0 stopped_seen=0
          continue
        else
          note "the request failed; trying again in ${interval}s"
        fi
        ;;
      ACTIVE)
        if ((fresh)); then
          setup || { watch_failed "setup"; continue; }
          fresh=0
        fi
        training=$(training_state)
        case $training in
          running) started=1 stopped_seen=0 ;;
          stopped*)
            if ((!started)); then
              run || { watch_failed "run"; continue; }
              started=1
            elif ((stopped_seen)); then
              local log_command="launch/tpu_vm.sh logs --name=$name --zone=$zone${project:+ --project=$project}"
              if [[ $training == "stopped 0" ]]; then
                note "the run on $name has finished; read the log with: $log_command"
                return 0
              fi
              note "the run on $name has failed or was stopped (exit status ${training#stopped }); read the log" \
                "with: $log_command"
              return 1
            else
              stopped_seen=1
            fi
            ;;
          unknown) note "worker 0 did not answer; looking again in ${interval}s" ;;
        esac
        ;;
      *) note "TPU $name is $state; waiting" ;;  # WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, ...
    esac
    sleep "$interval"
  done
}

watch_failed() {  # STEP: a failure during a preemption is expected; on an ACTIVE TPU it is not
  local state
  state=$(request_state) || state=unknown
  [[ $state != ACTIVE ]] || die "$1 failed on TPU $name, which is ACTIVE: fix the cause and watch again"
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
