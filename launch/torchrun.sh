#!/usr/bin/env bash
# Start `seqpar train` on this machine with one process per GPU (or per the recipe on CPU).
#
#   launch/torchrun.sh recipes/quickstart-cpu.yaml                       # CPU: 2 processes, gloo
#   launch/torchrun.sh recipes/longlora-llama2-7b-32k.yaml trainer.max_steps=10 --resume
#   NPROC=4 launch/torchrun.sh RECIPE ...                                 # force the process count
#   SEQPAR_CPU=1 launch/torchrun.sh RECIPE ...                            # ignore GPUs, use gloo on CPU
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
echo "seqpar: torchrun with $nproc process(es) per node (GPUs visible: $gpus)" >&2
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
  -m seqpar train "$RECIPE" ${extra[@]+"${extra[@]}"} "$@"  # the user's overrides win, in any order with flags
