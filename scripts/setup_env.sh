#!/usr/bin/env bash
# Create ./.venv and install megatron-grace into it (idempotent; re-installs when setup.py or
# this script change). Torch is pinned in the same pip command so that pip never resolves an
# unpinned torch to a multi-GB CUDA build; override with GRACE_TORCH="torch==X.Y.Z".
# Usage: source scripts/setup_env.sh   (sets $GRACE_PY to the venv's python)
set -euo pipefail
GRACE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GRACE_VENV:-$GRACE_ROOT/.venv}"
TORCH_SPEC="${GRACE_TORCH:-torch==2.13.0}"
EXTRAS="${GRACE_EXTRAS:-dev,megatron,deepspeed}"
PY="${PYTHON:-python3}"
stamp="$VENV/.grace-installed"
want="$(cat "$GRACE_ROOT/setup.py" "$GRACE_ROOT/pyproject.toml" "$GRACE_ROOT/scripts/setup_env.sh" $(ls "$GRACE_ROOT"/csrc/* 2>/dev/null) | sha256sum | cut -c1-16) $TORCH_SPEC $EXTRAS"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and megatron-grace[$EXTRAS] into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy scipy matplotlib tqdm setuptools wheel >&2
  (cd "$GRACE_ROOT" && "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[$EXTRAS]" "$TORCH_SPEC" >&2)
  echo "$want" > "$stamp"
fi
GRACE_PY="$VENV/bin/python"
export GRACE_PY
