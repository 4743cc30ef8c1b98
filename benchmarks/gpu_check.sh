#!/usr/bin/env bash
# The one command for a machine with a GPU (benchmarks/gpu_check.py says what it runs and writes):
#
#     bash benchmarks/gpu_check.sh OUT                 # e.g. OUT=$OUT under the device tool (carry .gpu_wheels)
#     bash benchmarks/gpu_check.sh OUT --dry-run       # on the CPU box, tiny presets
#     bash benchmarks/gpu_check.sh OUT --only speed    # one step again
#
# Python: $PYTHON if set, else this checkout's .venv if it has one (the CPU box), else python3 (the GPU image's,
# which holds torch). The wheels the GPU image lacks come from .gpu_wheels/ (benchmarks/fetch_gpu_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$py" benchmarks/gpu_check.py "$@"
