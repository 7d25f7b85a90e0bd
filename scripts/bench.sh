#!/usr/bin/env bash
# `make bench`: every benchmark, each printing its figures and the ratio to its baseline. A failing
# benchmark does not stop the others: the end lists the failures and the exit status is non-zero.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh" || exit 1
source "$here/scripts/env.sh"
source "$here/scripts/bench_steps.sh"
llmt_link_addon

DB=${LLMT_BENCH_DB:-llm_bench}
conf="$LLMT_RUN/bench/odoo.conf"

bench_validation() {
  LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" LLMT_TRAINER_PYTHON="$LLMT_TRAINER_VENV/bin/python" \
    "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_validation.py"
}
bench_database() {
  llmt_write_config "$conf" "$DB" "${LLMT_BENCH_PORT:-8269}" "$LLMT_RUN/bench/data" "$LLMT_ROOT/tests/addons" &&
  dropdb --if-exists "$DB" &&
  llmt_odoo -c "$conf" -d "$DB" -i llm_training,llm_training_test_provider --without-demo=all --stop-after-init \
    --logfile="$LLMT_RUN/bench/install.log"
}
bench_cron() { "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_cron.py" -c "$conf" -d "$DB"; }
bench_api() { "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_api.py" -c "$conf" -d "$DB"; }
bench_ray() {
  LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" LLMT_TRAINER_PYTHON="$LLMT_TRAINER_VENV/bin/python" \
    "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_ray.py"
}
bench_training() {
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_training
}
bench_model_server() {
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_model_server
}
bench_contended() {
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_training --contended
}
bench_export() {
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_export 2>/dev/null
}
bench_serving() {  # llama.cpp's log goes to stderr
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_serving 2>/dev/null
}
bench_evaluation() {
  cd "$here" && PYTHONPATH="$here" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" "$LLMT_TRAINER_VENV/bin/python" -m bench.bench_evaluation
}

bench_step "dataset validation (Odoo's Python)" bench_validation
bench_step "benchmark database $DB (the addon and the scripted provider)" bench_database
if [ ${#LLMT_BENCH_FAILED[@]} -eq 0 ]; then
  bench_step "sync engine at scale (Odoo, PostgreSQL)" bench_cron
  bench_step "OpenAI-compatible API latency, 1,000 jobs (Odoo's HTTP server; baseline: XML-RPC on the same server)" bench_api
else
  echo "!! skipped: sync engine and API benchmarks (no benchmark database)"
  LLMT_BENCH_FAILED+=("sync engine at scale (skipped)" "OpenAI-compatible API latency (skipped)")
fi
bench_step "Ray overhead: submit to first step, local vs Ray (a real single-node head)" bench_ray
bench_step "training throughput (trainer venv)" bench_training
bench_step "training beside a busy process on one core: tuning controller vs all threads + start-up probe (trainer venv)" bench_contended
bench_step "API: answers through the persistent model server vs in-process generate (trainer venv)" bench_model_server
bench_step "export to GGUF: time, memory, llama.cpp vs our model server (trainer venv)" bench_export
bench_knowledge() {
  LLMT_TRAINER_PYTHON="$LLMT_TRAINER_VENV/bin/python" "$LLMT_ODOO_VENV/bin/python" "$here/bench/bench_knowledge.py"
}
bench_step "knowledge: indexing vs a cookbook loop, search p50/p95 and recall at 10k/100k chunks, hit rate@5 and MRR (Odoo's Python, model server)" bench_knowledge
bench_step "serving many chats: batched vs one at a time, two adapters, bf16 flips, llama.cpp 8 slots (trainer venv)" bench_serving
bench_step "evaluation: batched greedy generation vs a one-at-a-time generate loop (trainer venv)" bench_evaluation
bench_summary
