#!/usr/bin/env bash
# The GPU day (issue 26): everything seqpar checks only on CUDA, in one script and one results file.
#
#   scripts/gpu-check.sh [OUT]          # default OUT=runs/gpu-check; about 8 minutes on one GPU
#
# 1. the machine (nvidia-smi, torch, flash-attn);  2. `make test-gpu` (tests/gpu: every kernel backend and
# decomposition in bf16/fp16 against float64, each primitive on one GPU, a patched bf16 training step, NCCL parity
# where 2 GPUs are visible);  3. `seqpar bench gpu` (block-kernel backends vs SDPA, TFLOP/s);  4. a short real
# `seqpar train` run in bf16 of the quick-start model patched with ring attention (one GPU: SP = 1, so it checks
# the CUDA path of the trainer, not the exchange). Each step has its own time limit; a step that fails is
# recorded and the next one still runs. The results file is OUT/results.md (the logs are next to it).
# Set-up: on a GPU machine `make setup CONSTRAINTS=` (no CPU pin) first, or let this script do it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
REPORT="$OUT/results.md"
PY=.venv/bin/python
STATUS=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, one line in the report
    local name=$1 limit=$2; shift 2
    local start=$SECONDS rc
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        echo "- **$name**: passed in ${took} s (\`$*\`)" >>"$REPORT"
    else
        [ "$rc" -eq 124 ] && why="timed out after ${limit} s" || why="exit $rc"
        echo "- **$name**: FAILED, $why, after ${took} s (\`$*\`; log: $name.log)" >>"$REPORT"
        STATUS=1
    fi
    { echo '```'; tail -n 15 "$OUT/$name.log"; echo '```'; } >>"$REPORT"
}

[ -x "$PY" ] || make setup CONSTRAINTS= >"$OUT/setup.log" 2>&1 || { echo "make setup CONSTRAINTS= failed: see $OUT/setup.log"; exit 1; }

{
    echo "# seqpar GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; else echo "nvidia-smi: not found"; fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    "$PY" -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (pip install -e '.[flash]')"
    echo '```'
    echo
} >"$REPORT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "- no CUDA device is visible to torch: nothing to check (this script is for a GPU machine)" >>"$REPORT"
    cat "$REPORT"
    exit 1
fi

step test-gpu 240 "$PY" -m pytest -q -rs tests/gpu
step bench-gpu 150 .venv/bin/seqpar bench gpu --quick --repeats 3 --out "$OUT/bench"
step train-bf16 120 .venv/bin/torchrun --nproc_per_node 1 -m seqpar train recipes/quickstart-cpu.yaml \
    attention.name=ring attention.sp_size=1 launch.nproc_per_node=1 launch.device=cuda trainer.dtype=bf16 \
    trainer.max_steps=5 data.passkey.num_samples=8 logging.wandb=false trainer.output_dir="$OUT/train"

echo >>"$REPORT"
[ "$STATUS" -eq 0 ] && echo "All steps passed." >>"$REPORT" || echo "Some steps FAILED (logs in $OUT)." >>"$REPORT"
cat "$REPORT"
exit "$STATUS"
