#!/usr/bin/env bash
# Main job: set up ./.venv (first run only) and run `grace demo` on the bundled real data.
# Extra arguments go to `grace demo` (e.g. --out DIR).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
exec "$(dirname "$GRACE_PY")/grace" demo "$@"
