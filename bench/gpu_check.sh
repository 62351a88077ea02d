#!/usr/bin/env bash
# The GPU check (see bench/gpu_check.py): run from anywhere on a GPU host, results in OUT_DIR.
#   bench/gpu_check.sh OUT_DIR [--wheels DIR] [--stages env,tests,gdn,fla,attention,train] [--smoke]
# Makes sleepjax.kernels importable first (kernels/ is mapped onto it by pyproject; without an install a
# symlink does it), then runs every stage with its own timeout; the whole run stops after 470 s.
set -u
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ $# -lt 1 ]; then echo "usage: $0 OUT_DIR [gpu_check.py options]" >&2; exit 2; fi
if ! "$PY" -c "import sleepjax.kernels" 2>/dev/null; then
  [ -e sleepjax/kernels ] || ln -sfn ../kernels sleepjax/kernels
  "$PY" -c "import sleepjax.kernels" 2>/dev/null || "$PY" -m pip install --no-deps --no-build-isolation -e . >&2
fi
LIMIT=470
case " $* " in *" --smoke "*) LIMIT=3600 ;; esac
exec timeout "$LIMIT" "$PY" bench/gpu_check.py "$@"
