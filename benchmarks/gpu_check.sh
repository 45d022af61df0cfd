#!/usr/bin/env bash
# One prepared run of every check that needs a CUDA GPU, sized for a lent machine (the `device`
# tool gives ~15 minutes of device time per session, one command at most 10 minutes):
#   1. the tests that run on CUDA (the Triton lookup kernels against the reference, forward and
#      backward, fp32 and bf16), which skip or run on CPU without CUDA here;
#   2. `python -m benchmarks memory_lookup` on CUDA: ours (Triton) vs F.embedding_bag vs FBGEMM's TBE when
#      installed, with effective GB/s (target >= 3 TB/s on H100-class memory);
#   3. `python -m benchmarks memory_vs_dense` on CUDA, fp32 and bf16 values: the memory model's training
#      tokens/s against its dense baseline.
# Every stage has its own time limit and a failing stage does not stop the next. Results and logs go
# to $OUT (default benchmarks/results/gpu) as one archive plus a summary, so they come back through
# the device tool's file limits; copy them into benchmarks/results/gpu/ and commit.
#
# The device image has torch, triton, pytest, sentencepiece and safetensors but not omegaconf
# (the trainer's config library). Fetch its wheel here first (.whl/ is git-ignored), then carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560
# GPU_CHECK_QUICK=1 shrinks every stage to a smoke run (checks the script itself on any machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
mkdir -p "$OUT/files"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/memscale_torch_ext}
export HF_HOME=${HF_HOME:-$(mktemp -d)}

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS CMD...: run CMD under a time limit, log to files/NAME.log, record its status
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/files/$name.log" 2>&1
    local rc=$?
    say "[$name] exit $rc after $((SECONDS - t0)) s: $*"
    tail -n 25 "$OUT/files/$name.log" | sed 's/^/    /' >>"$SUMMARY"
}

say "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) quick=$QUICK"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$SUMMARY"
"$PY" - <<'PY' 2>&1 | tee -a "$SUMMARY"
import torch, importlib.util as u
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for m in ("triton", "fbgemm_gpu", "omegaconf", "sentencepiece"):
    print(m, "yes" if u.find_spec(m) else "MISSING")
PY

if [ "$QUICK" = 1 ]; then
    stage tests_memlayers 300 "$PY" -m pytest -q -x -p no:cacheprovider tests/memlayers/test_triton_lookup.py tests/memlayers/test_lookup.py
    stage memory_lookup 120 "$PY" -m benchmarks memory_lookup --quick --skip-value-step --out-dir "$OUT/files"
    DEV=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    stage memory_vs_dense 300 "$PY" -m benchmarks memory_vs_dense --device "$DEV" --n-keys 64 --steps 2 --warmup 1 \
        --optimizers row_sparse_adam --out "$OUT/files"
else
    # the tests first: a kernel that is wrong on the GPU makes its timings meaningless
    stage tests_gpu 150 "$PY" -m pytest -q -p no:cacheprovider tests/memlayers/test_triton_lookup.py \
        tests/memlayers/test_lookup.py tests/memlayers/test_lookup_cpu.py
    stage memory_lookup 170 "$PY" -m benchmarks memory_lookup --dims 256 1024 --devices cuda --skip-value-step \
        --out-dir "$OUT/files"
    stage memory_vs_dense 100 "$PY" -m benchmarks memory_vs_dense --device cuda --n-keys 1024 --steps 10 --warmup 3 \
        --optimizers adamw,row_sparse_adam,row_sparse_adam:fused --out "$OUT/files"
    stage memory_vs_dense_bf16 80 "$PY" -m benchmarks memory_vs_dense --device cuda --n-keys 1024 --steps 10 --warmup 3 \
        --value-dtype bf16 --optimizers row_sparse_adam:fused,row_sparse_adam:fused:stochastic --out "$OUT/files"
fi

tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" files && rm -rf "$OUT/files"
say "results: $OUT/gpu_check.tar.gz (logs, memory_lookup.{json,md}, memory_vs_dense*.{json,md})"
