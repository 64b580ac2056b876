#!/bin/bash
# Launch one pnode_dist app inside a SLURM job; the *.sbatch scripts call it:
#     jobscripts/run_app.sh APP [app arguments...]
# - Output, training states and plots go to $PNODE_RUNS/APP-<job id> (PNODE_RUNS defaults to
#   runs/ in the submit directory). A requeued job keeps its id, so it finds its own states.
# - Launcher: PNODE_LAUNCHER=srun (default; one task per MPI rank, PMI2) or mpiexec (MPICH's
#   Hydra, which starts its proxies through SLURM inside the allocation).
# - Environment: the virtual environment $PNODE_VENV (default .venv in the submit directory).
# - Files: training states and outputs go to the shared file system (above); the HDF5 tier of
#   the checkpoints (used beyond --host-bytes) goes to node-local scratch, $PNODE_SCRATCH =
#   ${PNODE_LOCAL_DIR:-${TMPDIR:-/tmp}}/pnode-<job id>, the same path on every node, made on
#   every node before the launch and removed from every node at the end (--disk-dir overrides).
# - A lost node: when the launch fails and a node of the job no longer answers, the job waits
#   for SLURM to notice (it cancels the job with NODE_FAIL and requeues it, see #SBATCH
#   --requeue) and requeues itself if SLURM has not after twice its SlurmdTimeout; the next
#   start resumes from the newest valid training state on whatever nodes it gets.
# - Exit status: the first failing task's own status (each task records it in
#   $out/.exit-codes; srun ends the others with SIGTERM and would report their 143).
# - Stopping early: SIGUSR1 (from `#SBATCH --signal=B:USR1@<seconds>`) or SIGTERM (the time
#   limit) reaching this script is forwarded to the app, which saves its training state at the
#   next iteration and exits with status 75. The job then requeues itself (`scontrol requeue`,
#   needs `#SBATCH --requeue`) and the next start continues with --resume auto.
set -uo pipefail
# Without set -e: every step that can fail checks its own status (exit 2: the job's setup).
[ $# -ge 1 ] || { echo "usage: run_app.sh APP [app arguments]" >&2; exit 2; }
app=$1
shift
stop_signal=""
app_pid=""
forward_stop() {                 # the app saves its state and exits with status 75
  stop_signal=$1
  echo "received SIG$1: asking $app to save its state and stop"
  [ -z "$app_pid" ] || kill -USR1 "$app_pid" 2>/dev/null
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM     # (set first: a stop during the setup is kept)
if [ -z "${SLURM_SUBMIT_DIR:-}" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "run this inside a SLURM job (sbatch jobscripts/$app.sbatch)" >&2
  exit 2
fi
cd "$SLURM_SUBMIT_DIR" \
  || { echo "cannot enter the submit directory $SLURM_SUBMIT_DIR" >&2; exit 2; }
case $app in
  ''|*[!A-Za-z0-9_-]*) echo "APP must be the name of an app in apps/ (got '$app')" >&2; exit 2 ;;
esac
if [ ! -f "apps/$app.py" ]; then
  echo "no app apps/$app.py in $PWD (submit from the repository root)" >&2
  exit 2
fi
venv=${PNODE_VENV:-$PWD/.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "no Python environment at $venv: run 'make setup' in $PWD or set PNODE_VENV" >&2
  exit 2
fi
# shellcheck disable=SC1091
source "$venv/bin/activate" || { echo "cannot activate $venv" >&2; exit 2; }
out=${PNODE_RUNS:-runs}/$app-$SLURM_JOB_ID
mkdir -p "$out" || { echo "cannot create the output directory $out" >&2; exit 2; }
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
case ${PNODE_LAUNCHER:-srun} in
  srun)    launch=(srun --mpi=pmi2 --kill-on-bad-exit=1) ;;
  mpiexec) [ -n "${SLURM_NTASKS:-}" ] \
             || { echo "PNODE_LAUNCHER=mpiexec needs SLURM_NTASKS (sbatch --ntasks)" >&2; exit 2; }
           launch=(mpiexec -n "$SLURM_NTASKS") ;;
  *)       echo "PNODE_LAUNCHER must be srun or mpiexec, not '$PNODE_LAUNCHER'" >&2; exit 2 ;;
esac
nodes=${SLURM_JOB_NUM_NODES:-1}
on_every_node() {                # one task per node of the job, bounded in time
  timeout "$1" srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${@:2}"
}
limit=$(scontrol show config 2>/dev/null | awk '$1 == "SlurmdTimeout" {print 2 * $3}')
limit=${limit:-600}              # how long a lost node may go unnoticed by SLURM
export PNODE_SCRATCH=${PNODE_LOCAL_DIR:-${TMPDIR:-/tmp}}/pnode-$SLURM_JOB_ID
remove_scratch() { on_every_node 60 rm -rf "$PNODE_SCRATCH" >/dev/null 2>&1; }
trap remove_scratch EXIT
on_every_node 120 mkdir -p "$PNODE_SCRATCH" \
  || { echo "cannot create the node-local scratch $PNODE_SCRATCH on every node" >&2; exit 2; }

echo "job $SLURM_JOB_ID (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on ${SLURM_JOB_NODELIST:-?}:" \
     "$app with ${SLURM_NTASKS:-?} ranks via ${launch[0]}, output in $out," \
     "node-local scratch $PNODE_SCRATCH"

# Each task records its own exit status (in a file named after its host and pid) in $codes,
# on the shared file system: when one task fails, srun ends the others with SIGTERM and
# reports the highest status, which would then be theirs (143), not the failure's.
codes=$out/.exit-codes
rm -rf "$codes" && mkdir -p "$codes" \
  || { echo "cannot create $codes for the tasks' exit statuses" >&2; exit 2; }
# The launchers signal a task's whole process group: the wrapper outlives USR1/TERM (the
# trap), the app gets them and acts (saves its state and exits 75, or dies).
task='trap : USR1 TERM; "$@"; s=$?; echo "$s" >"$PNODE_EXIT_CODES/$(hostname)-$$" 2>/dev/null; exit "$s"'
PNODE_EXIT_CODES=$codes "${launch[@]}" bash -c "$task" task \
  python "apps/$app.py" --out "$out" --no-progress --resume auto "$@" &
app_pid=$!
# A signal that came before the launch was only recorded: pass it on now.
[ -z "$stop_signal" ] || kill -USR1 "$app_pid" 2>/dev/null
while :; do                      # `wait` returns early whenever a trapped signal arrives
  wait "$app_pid"
  status=$?
  kill -0 "$app_pid" 2>/dev/null || break
done
first_failure() {                # the status of the task that failed first, by its own hand
  local file code fallback=""    # (codes from SIGTERM/SIGKILL: ended by srun, or not)
  for file in $(ls -tr "$codes" 2>/dev/null); do
    code=$(cat "$codes/$file" 2>/dev/null) || continue
    case $code in
      0|'') ;;
      143|137) fallback=${fallback:-$code} ;;
      *) echo "$code"; return ;;
    esac
  done
  echo "$fallback"
}
if [ "$status" -gt 128 ]; then
  first=$(first_failure)
  if [ -n "$first" ] && [ "$first" != "$status" ]; then
    echo "a task of $app failed with status $first, then the launcher ended the others" \
         "(status $status): the job's status is $first"
    status=$first
  fi
fi
rm -rf "$codes"

if [ -f "$out/metrics.json" ] && [ "$status" -eq 0 ]; then
  echo "$app finished: $out/metrics.json"
  exit 0
fi
lost_node() {                    # true when a node of this job no longer answers
  [ "$nodes" -gt 1 ] && ! on_every_node 60 true >/dev/null 2>&1
}
if [ "$status" -ne 0 ] && [ "$status" -ne 75 ] && [ -z "$stop_signal" ] && lost_node; then
  echo "$app ended with status $status and a node of job $SLURM_JOB_ID does not answer:" \
       "waiting up to $limit s for SLURM to requeue the job"
  for (( waited = 0; waited < limit; waited++ )); do
    [ -z "$stop_signal" ] || exit 0    # SLURM cancelled the job (NODE_FAIL) and requeues it
    sleep 1
  done
  stop_signal=NODE                 # SLURM did not: requeue below
fi
if [ "$status" -eq 75 ] || [ -n "$stop_signal" ]; then
  echo "$app stopped before the end (status $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "could not requeue (was the job submitted with --requeue?); resubmit with" \
       "PNODE_RUNS=... and --resume auto to continue from $out/state" >&2
fi
exit "$status"
