#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc (compile only, sm_80 + sm_90), so the CUDA kernels cannot rot on
# CPU-only machines. Needs nvcc and an importable torch (headers); no GPU and no CUDA build of torch.
# The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stub is made in a temp dir.
# Keep the .cu headers light (no ATen/cuda/CUDAContext.h: it needs cuSPARSE headers; use
# c10/cuda/CUDAStream.h and c10/cuda/CUDAGuard.h), or the check slows down or fails here.
# Also checked, per file:
#   - it is compiled with -DNDEBUG (as a release build) and its PTX must still call __assertfail:
#     the kernels' out-of-range guards are CUDA_KERNEL_ASSERT (kept with NDEBUG), never assert();
#   - no host synchronisation in the source: .item(), .cpu(), nonzero, cudaDeviceSynchronize,
#     cudaStreamSynchronize, cudaMemcpy (non-async) are rejected (the ops must be sync-free).
# Usage: scripts/nvcc_compile_check.sh [file.cu ...]   (env: PYTHON, NVCC, NVCC_ARCHS="80 90")
# Exit status: 0 when every file compiles, 1 on any compile error, 2 when nvcc/torch are missing.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in "$ROOT/.venv/bin/python" python3; do
    if [[ -x "$cand" ]] || command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
[[ -x "$NVCC" ]] || { echo "nvcc_compile_check: nvcc not found" >&2; exit 2; }
INCLUDES="$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null)" \
  || { echo "nvcc_compile_check: torch not importable with $PY" >&2; exit 2; }
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
GENCODE=()
for a in ${NVCC_ARCHS:-80 90}; do GENCODE+=("-gencode=arch=compute_$a,code=sm_$a"); done
if [[ $# -gt 0 ]]; then FILES=("$@"); else mapfile -t FILES < <(ls "$ROOT"/csrc/*.cu 2>/dev/null); fi
[[ ${#FILES[@]} -gt 0 ]] || { echo "nvcc_compile_check: no .cu files"; exit 0; }
status=0
for f in "${FILES[@]}"; do
  start=$(date +%s)
  name="$(basename "$f")"
  # host synchronisation is not allowed in the CUDA ops (comments stripped first)
  if sed -e 's://.*$::' "$f" | grep -nE '\.item[<(]|\.cpu\(\)|\bnonzero\b|cudaDeviceSynchronize|cudaStreamSynchronize|cudaMemcpy\(' > "$TMP/sync.txt"; then
    echo "FAIL  $name: host synchronisation in a CUDA op:"; cat "$TMP/sync.txt"; status=1
  fi
  keep="$TMP/keep-$name"
  mkdir -p "$keep"
  # same macros as torch.utils.cpp_extension's CUDA builds (plus -DNDEBUG); host compiler sees the same warnings
  if "$NVCC" -c "$f" -o "$TMP/$name.o" "${GENCODE[@]}" -std=c++17 -O1 --expt-relaxed-constexpr --fmad=false -diag-suppress=3306 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -DGRACE_WITH_CUDA=1 -DNDEBUG \
      --keep --keep-dir "$keep" \
      -Xcompiler -fPIC -I"$TMP/stub" -I"$ROOT/csrc" $INCLUDES -I"$PYINC" 2> "$TMP/err.txt"; then
    asserts=$(cat "$keep"/*.ptx 2>/dev/null | grep -c '__assertfail' || true)
    if grep -q 'CUDA_KERNEL_ASSERT' "$f" && [[ "${asserts:-0}" -eq 0 ]]; then
      echo "FAIL  $name: CUDA_KERNEL_ASSERT in the source but no __assertfail in the PTX built with -DNDEBUG"; status=1
    else
      echo "ok    $name ($(( $(date +%s) - start )) s, ${asserts:-0} device-assert calls in the PTX with -DNDEBUG)"
    fi
  else
    echo "FAIL  $name"; cat "$TMP/err.txt"; status=1
  fi
  rm -rf "$keep"
done
exit $status
