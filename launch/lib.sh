# Helpers shared by launch/tpu_vm.sh and launch/batch_gpu.sh; sourced, not run.
# Written for bash 3.2 too (macOS): no associative arrays, no ${x,,}, and empty
# arrays expanded as ${a[@]+"${a[@]}"} (bash < 4.4 calls "${a[@]}" unbound under set -u).
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=${PROG:-$(basename "$0")}
DRY_RUN=0

die() {  # a usage error: the message, and exit status 2
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {  # progress for the user, on stderr so that stdout stays the command list
  printf '%s: %s\n' "$PROG" "$*" >&2
}

shell_quote() {  # one word, quoted for a POSIX shell only when it needs to be
  local word=$1 out="'" rest sq="'"
  case $word in
    *[!A-Za-z0-9_@%+=:,./-]* | '') ;;
    *) printf '%s' "$word"; return ;;
  esac
  if [[ $word =~ ^(--[A-Za-z0-9][-A-Za-z0-9.]*=)(.*)$ ]]; then  # --flag='value': the same word, easier to read
    out=${BASH_REMATCH[1]}
    printf '%s' "$out"
    shell_quote "${BASH_REMATCH[2]}"
    return
  fi
  rest=$word
  while [[ $rest == *"$sq"* ]]; do  # ' becomes '\''
    out+="${rest%%"$sq"*}'\\''"
    rest=${rest#*"$sq"}
  done
  printf '%s' "$out$rest'"
}

quote_command() {  # the words as one copy-pastable line
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "$word")"
  done
  printf '%s\n' "$line"
}

execute() {  # with --dry-run print the command on stdout; otherwise echo it to stderr and run it
  if ((DRY_RUN)); then
    quote_command "$@"
  else
    printf '+ %s\n' "$(quote_command "$@")" >&2
    "$@"
  fi
}

execute_stdin() {  # execute FILE COMMAND...: the same, with standard input read from FILE
  local file=$1
  shift
  if ((DRY_RUN)); then
    printf '%s < %s\n' "$(quote_command "$@")" "$(shell_quote "$file")"
  else
    printf '+ %s < %s\n' "$(quote_command "$@")" "$(shell_quote "$file")" >&2
    "$@" <"$file"
  fi
}

pinned_jax_version() {  # the jax==VERSION pin in setup.cfg: the TPU and GPU installs match the CPU one
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^[[:space:]]*jax==([^[:space:]]+) ]]; then
      printf '%s\n' "${BASH_REMATCH[1]}"
      return
    fi
  done <"$REPO_ROOT/setup.cfg"
  die "no 'jax==VERSION' pin in $REPO_ROOT/setup.cfg (install_requires)"
}

require_gs_workdir() {  # COMMAND WORKDIR
  [[ -n $2 ]] || die "$1 needs --workdir=gs://BUCKET/PATH"
  [[ $2 == gs://?* ]] || die "$1: --workdir must be a gs:// path, got '$2': the machine is" \
    "temporary (a TPU VM can be preempted and recreated, a Batch VM is deleted after the job)," \
    "so checkpoints, metrics and TensorBoard logs must go to Cloud Storage for a restarted run to resume"
}

require_config_file() {  # COMMAND CONFIG: configs/x.py[:ARG], a file in this repository
  local file=${2%%:*}
  [[ -n $2 ]] || die "$1 needs --config=FILE, e.g. --config=configs/stage2.py"
  [[ $file != /* ]] || die "$1: --config=$2: give the path relative to the repository root" \
    "(the copy on the remote machine has another root), e.g. configs/stage2.py"
  [[ -f $REPO_ROOT/$file ]] || die "$1: --config=$2: no file $file in $REPO_ROOT"
}

warn_if_dirty() {  # REF WHAT: what goes remote is a commit; say so when the work tree differs from it
  local dirty
  [[ $1 == HEAD ]] || return 0
  dirty=$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) || return 0
  [[ -z $dirty ]] || note "note: $2; uncommitted changes are not in it"
}

# The command line both scripts take: COMMAND [--dry-run] [--spot] [--option=VALUE ...]
# [-- MAIN_ARGS...]. Each script defines `usage` and `set_option OPTION VALUE`; this sets
# the globals `command`, `spot`, `DRY_RUN` and the array `main_args`.
# shellcheck disable=SC2034  # spot and main_args are read by the scripts, not here
parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) spot=1 ;;
      --)
        shift
        main_args=("$@")
        for arg in "$@"; do  # after --, it would reach mgjax.main and the commands would run
          [[ $arg != --dry-run ]] || die "--dry-run goes before --; what follows -- is for mgjax.main"
        done
        return ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) && [[ $2 != --* ]] || die "$1 needs a value (as $1=VALUE or $1 VALUE)"
        set_option "$1" "$2"
        shift ;;
      *)
        [[ -z $command ]] || die "unexpected argument '$1' (flags for mgjax.main go after --)"
        command=$1 ;;
    esac
    shift
  done
}
