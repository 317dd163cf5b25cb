#!/usr/bin/env bash
# Build the pinned environment for the kvpress peer (bench/quality/kvpress_peer.py).
# kvpress 0.5.5 requires transformers < 5.3 (its hooks read `cache_position`, removed in 5.3), so it
# cannot share the main environment (transformers >= 5.17). torch is installed FIRST from the local
# CPU wheel: letting kvpress's deps resolve torch from the index would download GBs of CUDA wheels.
# Usage: bash bench/quality/setup_kvpress_env.sh [VENV_DIR]   (default: $KVPASS_CACHE_DIR or ~/.cache/kvpass, /kvpress-venv)
set -euo pipefail
CACHE="${KVPASS_CACHE_DIR:-$HOME/.cache/kvpass}"
VENV="${1:-$CACHE/kvpress-venv}"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import kvpress" 2>/dev/null; then
  echo "kvpress env already present: $VENV"
  exit 0
fi
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==2.13.0"
# Pin torch again in the same resolve so nothing can swap it for a CUDA build.
"${PIP[@]}" "torch==2.13.0" "transformers>=4.56,<5.3" "kvpress==0.5.5"
"$VENV/bin/python" - <<'PY'
import torch, transformers, kvpress  # noqa: F401
from importlib.metadata import version
print(f"kvpress env ok: torch {torch.__version__}, transformers {transformers.__version__}, kvpress {version('kvpress')}")
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
PY
echo "$VENV"
