#!/usr/bin/env bash
# `make bench`: both benchmarks, each printing its figures and the ratio to its baseline.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
source "$here/scripts/env.sh"
echo "== dataset validation (Odoo's Python) =="
"$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_validation.py" "$@"
echo "== training throughput (trainer venv) =="
cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_training
