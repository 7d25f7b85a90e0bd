# Paths shared by the set-up, demo and test scripts. Installs live in a cache outside the clone so
# that a fresh clone (CI) reuses them; each venv's folder name carries a hash of its pins, so a
# changed pin makes a new venv instead of patching an old one.
_llmt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_llmt_hash() { cat "$@" | sha1sum | cut -c1-10; }
export LLMT_ROOT="$_llmt_root"
export LLMT_CACHE="${LLMT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm_training}"
export LLMT_PY37="${LLMT_PY37:-/root/.pyenv/versions/3.7.16/bin/python}"
export LLMT_PY311="${LLMT_PY311:-$(command -v python3.11 || echo /root/.pyenv/versions/3.11.7/bin/python)}"
export LLMT_ODOO_VENV="$LLMT_CACHE/odoo-venv-$(_llmt_hash "$_llmt_root/requirements-odoo.txt" "$_llmt_root/scripts/prune_odoo_addons.py")"
export LLMT_TRAINER_VENV="$LLMT_CACHE/trainer-venv-$(_llmt_hash "$_llmt_root/requirements-trainer.txt")"
export LLMT_CLIENT_VENV="$LLMT_CACHE/client-venv-$(_llmt_hash "$_llmt_root/requirements-client.txt")"
export LLMT_CHROMIUM="${LLMT_CHROMIUM:-/usr/bin/chromium}"
export LLMT_NODE_DIR="$LLMT_CACHE/node-less3"
export LLMT_BASE_MODEL_DIR="$LLMT_CACHE/models/SmolLM2-135M-Instruct"
# llama.cpp's GGUF converters, taken from this llama-cpp-python source distribution (setup.sh).
export LLMT_LLAMA_CPP_PYTHON=0.3.36
export LLMT_LLAMA_CONVERT_DIR="$LLMT_CACHE/llama.cpp-convert-$LLMT_LLAMA_CPP_PYTHON"
export PATH="$LLMT_NODE_DIR/node_modules/.bin:$PATH"
# Odoo finds addons by folder name: link the clone (whatever its folder is called) as llm_training.
export LLMT_ADDONS_LINK_DIR="$LLMT_CACHE/addons-$(printf %s "$_llmt_root" | sha1sum | cut -c1-10)"
export LLMT_RUN="$_llmt_root/.run"

llmt_link_addon() {
  mkdir -p "$LLMT_ADDONS_LINK_DIR"
  ln -sfn "$LLMT_ROOT" "$LLMT_ADDONS_LINK_DIR/llm_training"
}

# llmt_write_config FILE DB HTTP_PORT DATA_DIR [EXTRA_ADDONS_DIR]
# LLMT_WORKERS=N: Odoo's multi-process server as production runs it (N HTTP workers, a cron worker,
# a longpolling process on HTTP_PORT+3, Odoo's default memory and time limits); 0 (the default,
# what the tests' in-process server uses): threaded.
llmt_write_config() {
  local addons="$LLMT_ADDONS_LINK_DIR"
  [ -n "${5:-}" ] && addons="$addons,$5"
  mkdir -p "$(dirname "$1")" "$4"
  cat > "$1" <<CONF
[options]
addons_path = $addons
db_name = $2
dbfilter = ^$2\$
list_db = False
http_interface = 127.0.0.1
http_port = $3
longpolling_port = $(( $3 + 3 ))
data_dir = $4
admin_passwd = admin
max_cron_threads = 1
workers = ${LLMT_WORKERS:-0}
llm_training_trainer_python = $LLMT_TRAINER_VENV/bin/python
llm_training_models_dir = $(dirname "$LLMT_BASE_MODEL_DIR")
llm_training_llama_convert_dir = $LLMT_LLAMA_CONVERT_DIR
CONF
}

llmt_odoo() { "$LLMT_ODOO_VENV/bin/python" "$LLMT_ROOT/scripts/odoo" "$@"; }
