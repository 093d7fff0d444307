#!/usr/bin/env bash
# Test suite: set up ./.venv (first run only) and run pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$GRACE_ROOT"
exec "$GRACE_PY" -m pytest -q tests "$@"
