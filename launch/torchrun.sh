#!/usr/bin/env bash
# Start `seqpar train` on this machine with one process per GPU (or per the recipe on CPU).
#
#   launch/torchrun.sh recipes/quickstart-cpu.yaml                       # CPU: 2 processes, gloo
#   launch/torchrun.sh recipes/longlora-llama2-7b-32k.yaml trainer.max_steps=10 --resume
#   NPROC=4 launch/torchrun.sh RECIPE ...                                 # force the process count
#   SEQPAR_CPU=1 launch/torchrun.sh RECIPE ...                            # ignore GPUs, use gloo on CPU
#
# Signals: SIGTERM / SIGUSR1 / SIGINT sent to this script go to torchrun, which passes them to every worker;
# with the recipe's checkpoint.on_signal (default SIGTERM, SIGUSR1) the workers finish the step, checkpoint
# and stop, and this script exits 75 ("preempted, resume me": rerun it with --resume). TORCHRUN_SHUTDOWN_TIMEOUT
# (default 300) is how long torchrun waits for that before it SIGKILLs the workers.
#
# PYTHON picks the interpreter (default: python3 on PATH).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE.yaml [key=value ...] [--resume] [--dry-run]" >&2
  exit 2
fi
RECIPE=$1
shift
PYTHON=${PYTHON:-python3}

gpus=0
if [[ "${SEQPAR_CPU:-0}" != "1" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi

extra=()
if [[ -n "${NPROC:-}" ]]; then
  nproc=$NPROC
elif [[ "$gpus" -gt 0 ]]; then
  nproc=$gpus
else
  # CPU: the recipe's launch.nproc_per_node, and gloo on CPU whatever the recipe says about devices.
  nproc=$("$PYTHON" - "$RECIPE" <<'PY'
import sys, yaml
recipe = yaml.safe_load(open(sys.argv[1])) or {}
print((recipe.get("launch") or {}).get("nproc_per_node", 1))
PY
)
  extra+=("launch.device=cpu")
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Each rank writes the step here when a signal stopped it (torchrun reports any stopped worker as 1).
export SEQPAR_PREEMPTED_FILE=${SEQPAR_PREEMPTED_FILE:-$(mktemp -u "${TMPDIR:-/tmp}/seqpar-preempted.XXXXXX")}
rm -f "$SEQPAR_PREEMPTED_FILE"
echo "seqpar: torchrun with $nproc process(es) per node (GPUs visible: $gpus)" >&2
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${TORCHRUN_SHUTDOWN_TIMEOUT:-300}" \
  -m seqpar train "$RECIPE" ${extra[@]+"${extra[@]}"} "$@" &  # the user's overrides win, in any order with flags
child=$!
for sig in TERM USR1 INT HUP; do
  trap "kill -s $sig $child 2>/dev/null || true" "$sig"   # pass it on; `wait` returns early, so wait again
done
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done
if [[ $rc -ne 0 && -s "$SEQPAR_PREEMPTED_FILE" ]]; then
  echo "seqpar: preempted after step $(cat "$SEQPAR_PREEMPTED_FILE"): the checkpoint is written; rerun with --resume" >&2
  rm -f "$SEQPAR_PREEMPTED_FILE"
  exit 75
fi
rm -f "$SEQPAR_PREEMPTED_FILE"
exit "$rc"
