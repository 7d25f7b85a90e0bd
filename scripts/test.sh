#!/usr/bin/env bash
# `make test`: set up what is missing, build a fresh test database (llm_test) with the addon and
# the scripted test provider, run the addon's tests with pytest-odoo (real Odoo, real PostgreSQL,
# XML-RPC over real HTTP on port 8169) and, beside them, the trainer's tests in the trainer venv, then print one
# summary line: "N passed, M failed".
# While developing: `bash scripts/test.sh tests/test_security.py [more pytest args]` runs only those
# addon tests (paths relative to the repo root, no trainer tests); `make test` runs everything.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh" || exit 1
source "$here/scripts/env.sh"
llmt_link_addon

# The trainer's tests need no database: with `make test` they run beside the addon's, from the start
# (the addon's tests spend much of their time waiting on trainers, servers and HTTP), each suite on
# its own half of the CPUs this process may use: two trainings whose threads spin on the same cores
# run several times slower than each on its own cores (the trainer sizes its threads to them).
trainer_out="$LLMT_CACHE/trainer-tests-${LLMT_TEST_DB:-llm_test}.out"
trainer_pid=
addon_pin=()
trainer_pin=()
if [ $# = 0 ]; then
  read -r addon_cpus trainer_cpus < <("$LLMT_TRAINER_VENV/bin/python" -c 'import os; c = sorted(os.sched_getaffinity(0))
h = len(c) // 2; print(",".join(map(str, c[:len(c) - h])), ",".join(map(str, c[len(c) - h:])) or "-")')
  if [ -n "${trainer_cpus:-}" ] && [ "$trainer_cpus" != "-" ] && command -v taskset >/dev/null; then
    addon_pin=(taskset -c "$addon_cpus")
    trainer_pin=(taskset -c "$trainer_cpus")
    echo "[test] CPUs: addon tests on $addon_cpus, trainer tests on $trainer_cpus"
  fi
fi
if [ -d "$here/trainer/tests" ] && [ $# = 0 ]; then
  # Through a link whose parent has no __init__.py: pytest must see `trainer` as the top package,
  # not as part of the addon at the repo root.
  link="$LLMT_CACHE/trainer-$(printf %s "$LLMT_ROOT" | sha1sum | cut -c1-10)"
  mkdir -p "$link" && ln -sfn "$LLMT_ROOT/trainer" "$link/trainer"
  (cd "$link" && PYTHONPATH="$link" LLMT_BASE_MODEL_DIR="$LLMT_BASE_MODEL_DIR" exec "${trainer_pin[@]}" "$LLMT_TRAINER_VENV/bin/python" \
     -m pytest -p no:cacheprovider -q -rfE --durations=10 --rootdir="$link" "$link/trainer/tests") >"$trainer_out" 2>&1 &
  trainer_pid=$!
  trap '[ -n "$trainer_pid" ] && kill "$trainer_pid" 2>/dev/null' EXIT
fi

DB=${LLMT_TEST_DB:-llm_test}
PORT=${LLMT_TEST_PORT:-8169}
conf="$LLMT_RUN/test/odoo.conf"
rm -rf "$LLMT_RUN/test"
llmt_write_config "$conf" "$DB" "$PORT" "$LLMT_RUN/test/data" "$LLMT_ROOT/tests/addons"
# The addon tests check Odoo's side on the transformers engine (no GGUF conversion of every model they
# train); the llama.cpp engine and the auto choice are tested in trainer/tests/test_llamacpp_engine.py.
echo "llm_training_serve_engine = ${LLMT_TEST_SERVE_ENGINE:-transformers}" >> "$conf"

dropdb --if-exists "$DB"
echo "[test] creating database $DB with llm_training and the test provider"
if ! llmt_odoo -c "$conf" -d "$DB" -i llm_training,llm_training_test_provider --stop-after-init \
     --logfile="$LLMT_RUN/test/install.log" || grep -qE " (ERROR|CRITICAL) " "$LLMT_RUN/test/install.log"; then
  grep -E " (ERROR|CRITICAL) " -A20 "$LLMT_RUN/test/install.log" | head -60
  echo "0 passed, 1 failed"
  exit 1
fi

# Two copies for the production-mode test (tests/test_production_mode.py): a multi-process Odoo
# serving both databases behind a db filter. A template copy takes seconds, an install 25 s.
for copy in "${DB}_pfa" "${DB}_pfb"; do
  dropdb --if-exists "$copy" && createdb -T "$DB" "$copy" || { echo "0 passed, 1 failed"; exit 1; }
  cp -a "$LLMT_RUN/test/data/filestore/$DB" "$LLMT_RUN/test/data/filestore/$copy" 2>/dev/null
done

addon="$LLMT_ADDONS_LINK_DIR/llm_training"
report() { grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$1" | tail -1; }
count() { report "$1" | grep -oE "[0-9]+ $2" | grep -oE '[0-9]+' || echo 0; }

selected=("$addon/tests")
if [ $# -gt 0 ]; then
  selected=()
  for arg in "$@"; do
    if [ -e "$here/$arg" ]; then selected+=("$addon/$arg"); else selected+=("$arg"); fi  # a path, or a pytest option
  done
fi
echo "[test] addon tests (pytest-odoo)"
(cd "$LLMT_RUN/test" && "${addon_pin[@]}" "$LLMT_ODOO_VENV/bin/pytest" -p no:cacheprovider --odoo-database="$DB" --odoo-config="$conf" \
   --odoo-log-level=warn -q -rfE -p no:warnings --durations=15 --rootdir="$LLMT_RUN/test" "${selected[@]}") 2>&1 | tee "$LLMT_RUN/test/addon.out"
addon_rc=${PIPESTATUS[0]}

trainer_rc=0
echo > "$LLMT_RUN/test/trainer.out"
if [ -n "$trainer_pid" ]; then
  echo "[test] trainer tests (Python 3.11, run beside the addon's)"
  wait "$trainer_pid"; trainer_rc=$?; trainer_pid=
  cp "$trainer_out" "$LLMT_RUN/test/trainer.out" && cat "$LLMT_RUN/test/trainer.out"
fi

passed=$(( $(count "$LLMT_RUN/test/addon.out" passed) + $(count "$LLMT_RUN/test/trainer.out" passed) ))
failed=$(( $(count "$LLMT_RUN/test/addon.out" failed) + $(count "$LLMT_RUN/test/trainer.out" failed)
           + $(count "$LLMT_RUN/test/addon.out" error) + $(count "$LLMT_RUN/test/trainer.out" error) ))
skipped=$(( $(count "$LLMT_RUN/test/addon.out" skipped) + $(count "$LLMT_RUN/test/trainer.out" skipped) ))
echo
echo "$passed passed, $failed failed, $skipped skipped"
[ "$addon_rc" = 0 ] && [ "$trainer_rc" = 0 ] && [ "$passed" -gt 0 ]
