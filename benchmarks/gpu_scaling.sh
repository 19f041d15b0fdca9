#!/usr/bin/env bash
# The scaling study's one prepared GPU call (issue 26, docs/measuring.md): on one H100 or H200 with a preinstalled
# PyTorch >= 2.9 and no network, from the source tree, installing nothing, in at most 8 minutes: AdamW against
# SNOO(AdamW) at as many sizes from about 2M parameters upward as fit, planned from a pilot run's speed and the
# sizes' FLOP counts (benchmarks/gpu_scaling.py says how), bf16 autocast, torch.compile, the WSD ladder; writes
# plan.md, and under study/ the CPU study's summary.md, summary.json (with the frontier fit), scaling.png and
# frontier.png.
#
# Usage: benchmarks/gpu_scaling.sh [OUT_DIR] [--cpu-smoke] [--data FILE] [--budget SECONDS]
#   OUT_DIR defaults to $OUT/gpu-scaling, else ./gpu-scaling. --cpu-smoke: tiny sizes on the CPU in at most two and a half
#   minutes (what the test suite runs, so that this script does not rot).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --cpu-smoke) args+=("$1") ;;
        --data | --budget | --budgets | --tokens-per-param) args+=("$1" "$2"); shift ;;
        *) out=$1 ;;
    esac
    shift
done
out=${out:-${OUT:+$OUT/gpu-scaling}}
out=${out:-gpu-scaling}
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python=${PYTHON:-$(command -v python || command -v python3)}
exec "$python" "$root/benchmarks/gpu_scaling.py" "$out" "${args[@]}"
