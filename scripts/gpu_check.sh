#!/usr/bin/env bash
# The GPU checks, in one run of at most 5 minutes on one CUDA GPU: every `gpu`-marked test,
# the bf16 training-step benchmark (benchmarks/gpu_step.py) and the memory checks
# (benchmarks/gpu_memory.py: device memory against the plan, the flush, no host sync). One PASS/FAIL line per check, a
# summary line last; exit status 1 when anything failed. Results go under $OUT when it is set
# (gpu_tests.xml, gpu_tests.log, gpu_step.json, gpu_memory.json, versions.txt).
#
# Usage, from anywhere:   bash scripts/gpu_check.sh
#                         bash scripts/gpu_check.sh --cpu-dry-run   (the script's own logic on a CPU
#                         machine: the gpu tests skip, so that line FAILs; a tiny benchmark on CPU)
# Needs: python with torch built for CUDA. What else the checks import (numpy, scipy, pytest,
# transformers) is installed from this working tree (`pip install -e ".[test]"`) only when
# missing; the package itself runs from the tree (PYTHONPATH), so no install is needed for it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
dry_run=0
[ "${1:-}" = "--cpu-dry-run" ] && dry_run=1
BUDGET_S=300
start=$SECONDS
fails=0
passes=0
verdict() {  # verdict PASS|FAIL name detail
    echo "$1 $2: $3"
    if [ "$1" = FAIL ]; then fails=$((fails + 1)); else passes=$((passes + 1)); fi
}
out_dir="${OUT:-}"
[ -n "$out_dir" ] && mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline

# 1. torch with CUDA, first: a CPU-only torch here would make every check meaningless.
if ! "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"; then
    verdict FAIL setup "torch is not importable by $PY; install a CUDA build of torch first"
    echo "gpu_check: $passes PASS, $fails FAIL"
    exit 1
fi
if [ $dry_run -eq 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    verdict FAIL setup "torch.cuda.is_available() is False (no GPU visible, or a CPU-only torch)"
    echo "gpu_check: $passes PASS, $fails FAIL"
    exit 1
fi

# 2. What the checks import; install from the working tree only what is missing (torch, with
#    CUDA, satisfies the package's torch requirement, so pip keeps it).
missing=$("$PY" - <<'EOF'
import importlib.util
wanted = ("numpy", "scipy", "pytest", "sklearn", "transformers")
print(" ".join(m for m in wanted if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "missing: $missing; pip install -e .[test]"
    timeout 150 "$PY" -m pip install -q -e ".[test]" || echo "pip install -e .[test] failed (offline?)"
fi
versions=$("$PY" - <<'EOF'
import importlib, platform, torch
gpu = "none"
if torch.cuda.is_available():
    gpu = f"{torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), GPU {gpu}")
for name in ("numpy", "scipy", "pytest", "transformers", "accelerate", "pytorch_lightning"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001 (report, do not stop)
        print(f"{name} not importable ({type(err).__name__})")
EOF
)
echo "$versions"
[ -n "$out_dir" ] && echo "$versions" > "$out_dir/versions.txt"

# 3. Every gpu-marked test. Only the files that hold one are collected: the others' imports
#    (TensorBoard, W&B, Lightning) are not needed here.
mapfile -t gpu_files < <(grep -l "mark\.gpu" tests/test_*.py)
log="${out_dir:-$(mktemp -d)}/gpu_tests.log"
junit=()
[ -n "$out_dir" ] && junit=(--junitxml "$out_dir/gpu_tests.xml")
timeout 150 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rfEs ${junit[@]+"${junit[@]}"} \
    ${gpu_files[@]+"${gpu_files[@]}"} > "$log" 2>&1
rc=$?
tail -n 25 "$log"
summary=$(tail -n 1 "$log")
# A skip is fine where its reason is a piece this machine truly lacks (a second GPU); every
# test skipped means CUDA was not seen.
if [ $rc -eq 0 ] && grep -q "passed" <<< "$summary"; then
    verdict PASS gpu_tests "$summary"
elif [ $rc -eq 0 ]; then
    verdict FAIL gpu_tests "no gpu test ran (all skipped: is CUDA visible to pytest?): $summary"
elif [ $rc -eq 5 ] || [ ${#gpu_files[@]} -eq 0 ]; then
    verdict FAIL gpu_tests "no test is marked gpu"
elif [ $rc -eq 124 ]; then
    verdict FAIL gpu_tests "timed out after 150 s"
else
    verdict FAIL gpu_tests "pytest exit status $rc: $summary"
fi

# A benchmark that prints its own PASS/FAIL/SKIP lines, within what is left of the budget:
# bench NAME SCRIPT [ARGS...] (a --json file under $OUT when it is set).
bench() {
    local name=$1 script=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - start) - 5))
    [ $left -lt 30 ] && left=30
    local args=("$@")
    [ -n "$out_dir" ] && args+=(--json "$out_dir/$name.json")
    local output rc line
    output=$(timeout "$left" "$PY" "$script" ${args[@]+"${args[@]}"} 2>&1)
    rc=$?
    echo "$output" | grep -v "^PASS \|^FAIL \|^SKIP " | tail -n 20
    while read -r line; do
        case "$line" in
            PASS\ *) passes=$((passes + 1)); echo "$line" ;;
            FAIL\ *) fails=$((fails + 1)); echo "$line" ;;
            SKIP\ *) echo "$line" ;;
        esac
    done <<< "$output"
    if [ $rc -eq 124 ]; then
        verdict FAIL "$name" "timed out after $left s"
    elif [ $rc -ne 0 ] && ! grep -q "^FAIL " <<< "$output"; then
        verdict FAIL "$name" "exit status $rc without a FAIL line (crashed?)"
    fi
}

# 4. The training-step benchmark.
if [ $dry_run -eq 1 ]; then
    bench gpu_step benchmarks/gpu_step.py --device cpu --tiny --steps 3 --reps 1
else
    bench gpu_step benchmarks/gpu_step.py
fi

# 5. The memory checks: the monitor's device memory against its plan, the flush, no host sync.
if [ $dry_run -eq 1 ]; then
    bench gpu_memory benchmarks/gpu_memory.py --device cpu --tiny
else
    bench gpu_memory benchmarks/gpu_memory.py
fi

elapsed=$((SECONDS - start))
if [ $elapsed -le $BUDGET_S ]; then
    verdict PASS time_budget "${elapsed} s <= ${BUDGET_S} s"
else
    verdict FAIL time_budget "${elapsed} s > ${BUDGET_S} s"
fi
echo "gpu_check: $passes PASS, $fails FAIL"
[ "$fails" -eq 0 ]
