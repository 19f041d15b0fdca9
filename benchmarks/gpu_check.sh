#!/usr/bin/env bash
# One prepared device check (issue 14, docs/gpu.md): on a machine with one NVIDIA GPU, no network and a preinstalled
# PyTorch >= 2.9, from the source tree, installing nothing, in at most 8 minutes:
#   1. env.txt             the GPU, driver, torch and CUDA versions
#   2. pytest_cuda.txt     the CUDA tests (pytest -m cuda tests/test_cuda.py), with pytest_cuda.xml
#   3. outer_step_gpu.md   the outer step against a device-to-device copy of its bytes, foreach and fused (compiled:
#                          SNOO(fused=True)), against the authors' approach; its cost at K = 1, 5, 20, 100
#   4. offload_step.md     the outer step with state in pinned host memory against the PCIe transfer floor
#   5. lab.md              AdamW vs SNOO(AdamW) at GPT-2 small's size (12 x 768, context 1024) on this machine's
#                          standard-library text, bf16 autocast, torch.compile, a few hundred steps each: tokens per
#                          second and final losses (runs under lab/)
#   summary.md             each part's exit status and seconds
# Every part has its own time limit and the whole check a budget (SNOO_GPU_CHECK_BUDGET, default 470 s): a part that
# would not fit is skipped and says so. A part that fails does not stop the others.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [--cpu-smoke]
#   OUT_DIR defaults to $OUT, else ./gpu-check. --cpu-smoke (or SNOO_GPU_CHECK_SMOKE=1) runs every part in its small
#   CPU form (quick benchmarks, the lab's tiny preset): what the test suite runs so that this script does not rot.
#   SNOO_GPU_CHECK_DATA: a text file for the lab runs instead of the standard library (the tests use a small one).
#   SNOO_GPU_CHECK_PARTS: the parts to run, e.g. "cuda-tests offload" (default: all of environment, cuda-tests,
#   outer-step, offload, lab).
set -uo pipefail

smoke=${SNOO_GPU_CHECK_SMOKE:-0}
out=""
for arg in "$@"; do
    case "$arg" in
        --cpu-smoke) smoke=1 ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) out=$arg ;;
    esac
done
out=${out:-${OUT:-gpu-check}}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root" || exit 1
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$python" ]; then echo "no python or python3 on PATH (or set PYTHON)" >&2; exit 2; fi
budget=${SNOO_GPU_CHECK_BUDGET:-470}
start=$SECONDS
data_flag=()
if [ -n "${SNOO_GPU_CHECK_DATA:-}" ]; then data_flag=(--data "$SNOO_GPU_CHECK_DATA"); fi

printf '# gpu_check %s\n\n| part | exit status | seconds |\n|---|---:|---:|\n' "$(date -u +%FT%TZ)" >"$out/summary.md"

# part NAME LIMIT_SECONDS OUTPUT_FILE COMMAND...: run COMMAND with stdout and stderr to OUTPUT_FILE, within LIMIT and
# what is left of the budget
part() {
    local name=$1 limit=$2 file=$3
    shift 3
    if [ -n "${SNOO_GPU_CHECK_PARTS:-}" ] && [[ " $SNOO_GPU_CHECK_PARTS " != *" $name "* ]]; then
        echo "| $name | not selected | 0 |" >>"$out/summary.md"
        return
    fi
    local left=$((budget - (SECONDS - start)))
    if [ "$left" -lt 15 ]; then
        echo "| $name | skipped: out of time | 0 |" >>"$out/summary.md"
        echo "== $name: skipped, the budget is spent"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "== $name (at most ${limit} s) -> $file"
    local t0=$SECONDS rc
    if declare -F "$1" >/dev/null; then
        part_limit=$limit "$@" >"$out/$file" 2>&1  # a function of this script keeps to part_limit itself
    else
        timeout --kill-after=10 "$limit" "$@" >"$out/$file" 2>&1
    fi
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "(stopped after ${limit} s)" >>"$out/$file"; fi
    echo "| $name | $rc | $((SECONDS - t0)) |" >>"$out/summary.md"
    tail -n 3 "$out/$file"
}

environment() {
    date -u
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$python" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
    print("bf16:", torch.cuda.is_bf16_supported())
else:
    print("no CUDA device")
EOF
}

# the lab: one run per optimizer, then one table
lab() {
    local steps=300 preset=base hardware=(--device cuda --set autocast=bf16 --set compile=on)
    local sizes=(--set grad_accum=1 --set eval_every=100 --set eval_batches=10 --set log_every=10 --set ckpt_every=100000)
    if [ "$smoke" = 1 ]; then
        steps=6 preset=tiny hardware=(--device cpu --set autocast=off --set compile=off --set threads=1)
        sizes=(--set eval_every=3 --set eval_batches=1 --set log_every=2 --set ckpt_every=100000)
    fi
    local spec name runs=2 lab_start=$SECONDS limit
    for spec in adamw "snoo(k=20)+adamw"; do
        name=${spec//[^a-z0-9]/_}
        limit=$(((part_limit - (SECONDS - lab_start)) / runs))  # an equal share of what is left
        runs=$((runs - 1))
        echo "-- snoo train --optimizer '$spec' --preset $preset --steps $steps (at most $limit s)"
        timeout --kill-after=10 "$limit" "$python" -m snoo train --optimizer "$spec" --preset "$preset" \
            --steps "$steps" "${hardware[@]}" "${sizes[@]}" "${data_flag[@]}" --no-progress --out "$out/lab/$name"
        echo "exit status $?"
    done
    "$python" - "$out/lab" <<'EOF'
import json, sys
from pathlib import Path

print("\n| optimizer | parameters | steps | final val loss | tokens/s (after step 20) | train seconds |")
print("|---|---:|---:|---:|---:|---:|")
for run in sorted(Path(sys.argv[1]).iterdir()):
    result, config = run / "result.json", run / "config.json"
    if not result.exists():
        print(f"| {run.name} | - | - | did not finish | - | - |")
        continue
    r, c = json.loads(result.read_text()), json.loads(config.read_text())
    if r["status"] != "ok":
        print(f"| {r['spec']} | {c['params'] / 1e6:.1f}M | {r['steps']} | {r['status']} | - | - |")
        continue
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in logged if m["step"] >= 20] or logged  # the first steps include compiling
    first, last = timed[0], timed[-1]
    rate = (last["tokens"] - first["tokens"]) / max(last["time"] - first["time"], 1e-9)
    print(
        f"| {r['spec']} | {c['params'] / 1e6:.1f}M | {r['steps']} | {r['final_val_loss']:.4f} | {rate:,.0f} "
        f"| {r['wall_time']:.0f} |"
    )
EOF
}

if [ "$smoke" = 1 ]; then
    bench_flags=(--quick)
    offload_flags=(--quick)
    tests_limit=120
else
    bench_flags=(--fused --repeats 20)
    offload_flags=(--repeats 5)
    tests_limit=180
fi

part environment 30 env.txt environment
part cuda-tests "$tests_limit" pytest_cuda.txt "$python" -m pytest -m cuda tests/test_cuda.py -q -rs \
    -p no:cacheprovider --junitxml="$out/pytest_cuda.xml"
part outer-step 240 outer_step_gpu.md "$python" benchmarks/outer_step_gpu.py "${bench_flags[@]}"
part offload 90 offload_step.md "$python" benchmarks/offload_step.py "${offload_flags[@]}"
part lab 300 lab.md lab

echo "| total | - | $((SECONDS - start)) |" >>"$out/summary.md"
cat "$out/summary.md"
echo "everything is under $out"
