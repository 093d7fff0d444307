#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the kernel tests (CPU + GPU) and the kernel benchmark.
# Needs torch with CUDA and nvcc. Writes build/test/bench logs and JSON under $OUT (default ./gpu_check_out).
# Budget: < 8 minutes (build ~2-4 min, tests ~1 min, benchmark ~1 min).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
export OUT
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' \
  | tee "$OUT/env.txt" || exit 2
# build only this GPU's arch (faster); GRACE_BUILD_EXT=1 makes a failed build an error
ARCH="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
start=$(date +%s)
GRACE_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-8}" \
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
echo "build rc=$rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
[[ $rc -eq 0 ]] || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c 'from megatron_grace import _ops; assert _ops.has_kernel("cuda"), "CUDA kernels missing"; print("CUDA kernels registered")' \
  | tee -a "$OUT/summary.txt" || exit 1
timeout 240 "$PY" -m pytest -q tests/test_kernels.py tests/test_ops.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
trc=$?
tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
timeout 120 "$PY" scripts/bench_kernels.py --tokens 4096 16384 --repeats 5 > "$OUT/bench.log" 2>&1
brc=$?
cat "$OUT/bench.log" | tee -a "$OUT/summary.txt"
echo "tests rc=$trc bench rc=$brc" | tee -a "$OUT/summary.txt"
[[ $trc -eq 0 && $brc -eq 0 ]]
