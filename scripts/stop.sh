#!/usr/bin/env bash
# `make stop`: stop the demo Odoo server started by `make demo`, and the model server its local
# provider started (one per Odoo data folder: <data_dir>/llm_training/model_server/).
set -uo pipefail
source "$(cd "$(dirname "$0")/.." && pwd)/scripts/env.sh"
pidfile="$LLMT_RUN/demo/odoo.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  kill "$(cat "$pidfile")"
  for _ in $(seq 20); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$(cat "$pidfile")" 2>/dev/null
  echo "[stop] Odoo stopped"
else
  echo "[stop] no demo Odoo running"
fi
rm -f "$pidfile"
"$LLMT_ODOO_VENV/bin/python" "$LLMT_ROOT/lib/model_server.py" stop "$LLMT_RUN/demo/data/llm_training/model_server"
