#!/usr/bin/env bash
# `make bench`: every benchmark, each printing its figures and the ratio to its baseline.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
source "$here/scripts/env.sh"
llmt_link_addon
echo "== dataset validation (Odoo's Python) =="
LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" LLMT_TRAINER_PYTHON="$LLMT_TRAINER_VENV/bin/python" "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_validation.py"
echo "== sync engine at scale (Odoo, PostgreSQL) =="
DB=${LLMT_BENCH_DB:-llm_bench}
conf="$LLMT_RUN/bench/odoo.conf"
llmt_write_config "$conf" "$DB" "${LLMT_BENCH_PORT:-8269}" "$LLMT_RUN/bench/data" "$LLMT_ROOT/tests/addons"
dropdb --if-exists "$DB"
llmt_odoo -c "$conf" -d "$DB" -i llm_training,llm_training_test_provider --without-demo=all --stop-after-init \
  --logfile="$LLMT_RUN/bench/install.log"
"$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_cron.py" -c "$conf" -d "$DB"
echo "== OpenAI-compatible API latency, 1,000 jobs (Odoo's HTTP server; baseline: XML-RPC on the same server) =="
"$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_api.py" -c "$conf" -d "$DB"
echo "== Ray overhead: submit to first step, local vs Ray (a real single-node head) =="
LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" LLMT_TRAINER_PYTHON="$LLMT_TRAINER_VENV/bin/python" "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_ray.py"
echo "== training throughput (trainer venv) =="
cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_training
echo "== training beside a busy process on one core: tuning controller vs all threads + start-up probe (trainer venv) =="
cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_training --contended
echo "== API: answers through the persistent model server vs in-process generate (trainer venv) =="
cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_model_server
