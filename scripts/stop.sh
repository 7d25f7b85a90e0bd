#!/usr/bin/env bash
# `make stop`: stop the demo Odoo server started by `make demo`, and the model servers local
# providers started (one per Odoo data folder: <data_dir>/llm_training/model_server/; the demo's,
# and any a test or benchmark run left behind).
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
for run_dir in "$LLMT_RUN"/*/data/llm_training/model_server; do
  [ -d "$run_dir" ] && (cd "$LLMT_ROOT" && "$LLMT_ODOO_VENV/bin/python" -m lib.serving.model_server stop "$run_dir")
done
exit 0
