#!/usr/bin/env bash
# Compile-check every csrc/*.cu with nvcc (compile only, sm_80 + sm_90), so the CUDA kernels cannot rot on
# CPU-only machines. Needs nvcc and an importable torch (headers); no GPU and no CUDA build of torch.
# The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a one-line stub is made in a temp dir.
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
  # same macros as torch.utils.cpp_extension's CUDA builds; host compiler sees the same warnings
  if "$NVCC" -c "$f" -o "$TMP/$(basename "$f").o" "${GENCODE[@]}" -std=c++17 -O1 --expt-relaxed-constexpr --fmad=false -diag-suppress=3306 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -DGRACE_WITH_CUDA=1 \
      -Xcompiler -fPIC -I"$TMP/stub" -I"$ROOT/csrc" $INCLUDES -I"$PYINC" 2> "$TMP/err.txt"; then
    echo "ok    $(basename "$f") ($(( $(date +%s) - start )) s)"
  else
    echo "FAIL  $(basename "$f")"; cat "$TMP/err.txt"; status=1
  fi
done
exit $status
