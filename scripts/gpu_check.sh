#!/usr/bin/env bash
# On a GPU machine (offline, torch with CUDA preinstalled): build the extension for this GPU, run every
# CUDA test, the graph-capture check and the GPU benchmarks; logs and JSON under $OUT (default
# ./gpu_check_out). Budget: under 8 minutes (build ~1 min with one arch, tests ~2, checks+benchmarks ~3).
# Optional: wheels in ./.whl (e.g. megatron-core for the Megatron baseline) are installed to /tmp/site first.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 GRACE_NO_PROGRESS=1 MPLBACKEND=Agg
S="$OUT/summary.txt"
: > "$S"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
  2>&1 | tee -a "$S" || exit 2
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$S" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# 1. build for this GPU only (PEP 660 editable install, no build isolation, no dependency resolution: offline-safe)
ARCH="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
start=$(date +%s)
GRACE_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [[ $rc -ne 0 ]]; then  # fall back to an in-place build (same extension, no pip)
  echo "pip editable install rc=$rc; trying setup.py build_ext --inplace" | tee -a "$S"
  GRACE_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" timeout 300 "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
  rc=$?
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "build rc=$rc ($(( $(date +%s) - start )) s)" | tee -a "$S"
[[ $rc -eq 0 ]] || { tail -40 "$OUT/build.log" | tee -a "$S"; exit 1; }
"$PY" -c 'from megatron_grace import _ops; assert _ops.has_kernel("cuda"), "CUDA kernels missing"; print("CUDA kernels registered")' 2>&1 | tee -a "$S" || exit 1
# 2. every test that has a CUDA variant (CPU variants run too; they are fast)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ops.py tests/test_routing.py tests/test_gpu_path.py \
  > "$OUT/tests.log" 2>&1
trc=$?
tail -3 "$OUT/tests.log" | tee -a "$S"
# 3. decode step: fullgraph compile (CPU), CUDA-graph capture + replay, no host sync under sync debug mode "error"
timeout 180 "$PY" scripts/check_graph_capture.py --json "$OUT/graph_capture.json" > "$OUT/checks.log" 2>&1
grc=$?
# 4. benchmarks: kernels (bandwidth vs device copy) and one layer vs the expert math and Megatron-Core
timeout 120 "$PY" scripts/bench_kernels.py --out "$OUT/kernels.json" >> "$OUT/checks.log" 2>&1
krc=$?
timeout 180 "$PY" scripts/bench_gpu_layer.py --out "$OUT/gpu_layer.json" >> "$OUT/checks.log" 2>&1
lrc=$?
grep -v "^\s*$" "$OUT/checks.log" | grep -iv "warning" | tail -60 | tee -a "$S"
echo "tests rc=$trc graph-capture rc=$grc bench_kernels rc=$krc bench_gpu_layer rc=$lrc" | tee -a "$S"
[[ $trc -eq 0 && $grc -eq 0 && $krc -eq 0 && $lrc -eq 0 ]]
