#!/usr/bin/env bash
# make gpu-check: the one run a machine with an NVIDIA GPU needs (about 5-8 minutes on an H100/H200).
#
#   1. builds spa_kernels._C_cuda for this GPU's architecture,
#   2. runs the cuda backend's tests and the Triton tests on the GPU,
#   3. runs `python -m bench --device cuda` for the linear and conv suites (bf16;
#      anchors: cuBLAS/cuDNN on compacted tensors, dense masked, sp_adapters, triton),
#   4. runs compute-sanitizer (memcheck) on a small case of every kernel,
#   5. writes everything to bench/results/<gpu>-<date>.md.
#
# Stops with exit status 3 and says why where no GPU can be used; otherwise
# runs every step, records each one's outcome, and exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export TRITON_INTERPRET=0  # compiled Triton on the GPU (tests/conftest.py defaults it to the interpreter)

cuda_state=$("$PY" - <<'PYTHON' 2>&1
import torch
print(f"torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, cuda available={torch.cuda.is_available()}")
PYTHON
)
if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no usable NVIDIA GPU here, nothing was run." >&2
    echo "  nvidia-smi: $(command -v nvidia-smi || echo 'not found'); python: $PY; $cuda_state" >&2
    echo "  Run this on a machine with a CUDA GPU and a CUDA build of PyTorch." >&2
    exit 3
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
day=$(date -u +%F)
report="bench/results/${slug}-${day}.md"
arch=$("$PY" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
mkdir -p bench/results
failed=()

{
    echo "# gpu-check on ${gpu}, ${day}"
    echo
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
    echo "- ${cuda_state}; sm_${arch}; nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
    echo "- driver: $(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader | head -n 1)"
    echo
} > "$report"

# step NAME TIMEOUT_S COMMAND...: runs COMMAND, appends its output to the report, records failure.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== ${name}"
    local log
    log=$(mktemp)
    local start=$SECONDS
    timeout "$limit" "$@" > "$log" 2>&1
    local status=$?
    local outcome="passed"
    [ $status -eq 0 ] || { outcome="FAILED (exit ${status}$([ $status -eq 124 ] && echo ', timed out'))"; failed+=("$name"); }
    {
        echo "## ${name}: ${outcome}, $((SECONDS - start)) s"
        echo
        echo '```'
        echo "\$ $*"
        tail -n 400 "$log"
        echo '```'
        echo
    } >> "$report"
    tail -n 5 "$log"
    echo "-- ${name}: ${outcome}"
    rm -f "$log"
}

step "build the extension for sm_${arch}" 300 env SPA_KERNELS_CUDA_ARCH="$arch" "$PY" setup.py --quiet build_ext --inplace
step "cuda backend tests" 240 "$PY" -m pytest -q -p no:cacheprovider -x --timeout 600 tests/backends/test_cuda_backend.py
step "triton tests on the GPU" 240 "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_triton_linear.py tests/backends/test_triton_conv.py
step "bench linear and conv, bf16" 300 "$PY" -m bench --device cuda --suite linear conv --seconds 0.5
if command -v compute-sanitizer >/dev/null 2>&1; then
    step "compute-sanitizer memcheck, small case" 180 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" tools/cuda_small_case.py
else
    echo "## compute-sanitizer: not found on PATH, skipped" >> "$report"
    failed+=("compute-sanitizer (not found)")
fi

{
    echo "## Summary"
    echo
    if [ ${#failed[@]} -eq 0 ]; then echo "Every step passed."; else printf -- '- failed: %s\n' "${failed[@]}"; fi
} >> "$report"
echo "gpu-check: report written to ${report}"
[ ${#failed[@]} -eq 0 ]
