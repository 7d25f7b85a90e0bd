#!/usr/bin/env bash
# `make demo`: set up what is missing, (re)create the llm_demo database with the addon and its demo
# data, start Odoo on http://127.0.0.1:8069 (admin / admin) in the background, then submit the demo
# fine-tuning job and follow it until the cron has trained it and registered its model.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
source "$here/scripts/env.sh"
llmt_link_addon

DB=llm_demo
PORT=${LLMT_DEMO_PORT:-8069}
conf="$LLMT_RUN/demo/odoo.conf"
# As production runs it: 2 HTTP workers, a cron worker, Odoo's default limits (see README, Deploying).
LLMT_WORKERS=2 llmt_write_config "$conf" "$DB" "$PORT" "$LLMT_RUN/demo/data"
bash "$here/scripts/stop.sh" >/dev/null

if psql -lqt | cut -d'|' -f1 | grep -qw "$DB"; then
  echo "[demo] updating the addon in database $DB"
  llmt_odoo -c "$conf" -d "$DB" -u llm_training --stop-after-init --logfile="$LLMT_RUN/demo/install.log"
else
  echo "[demo] creating database $DB with llm_training and its demo data (about 30 s)"
  llmt_odoo -c "$conf" -d "$DB" -i llm_training --stop-after-init --logfile="$LLMT_RUN/demo/install.log"
fi
grep -E " (ERROR|CRITICAL) " "$LLMT_RUN/demo/install.log" && { echo "[demo] install failed, see $LLMT_RUN/demo/install.log"; exit 1; }

echo "[demo] starting Odoo on http://127.0.0.1:$PORT (log: $LLMT_RUN/demo/odoo.log)"
setsid nohup "$LLMT_ODOO_VENV/bin/python" "$here/scripts/odoo" -c "$conf" --logfile="$LLMT_RUN/demo/odoo.log" \
  >/dev/null 2>&1 < /dev/null &
echo $! > "$LLMT_RUN/demo/odoo.pid"
for _ in $(seq 60); do
  curl -sf -o /dev/null "http://127.0.0.1:$PORT/web/login" && break
  sleep 1
done
curl -sf -o /dev/null "http://127.0.0.1:$PORT/web/login" || { echo "[demo] Odoo did not answer, see $LLMT_RUN/demo/odoo.log"; exit 1; }

"$LLMT_ODOO_VENV/bin/python" "$here/scripts/demo_job.py" --url "http://127.0.0.1:$PORT" --db "$DB"
echo "[demo] Odoo keeps serving http://127.0.0.1:$PORT (login admin / admin) until 'make stop'."
