#!/usr/bin/env bash
# Create a separate venv with CPU torch 2.13.0 and LMCache 0.5.6 for the baseline benchmark.
# Usage: benchmarks/lmcache_baseline/setup.sh   (venv path: $LMCACHE_VENV, default ~/.cache/kvtier/lmcache-venv)
# Idempotent: does nothing if the venv already has lmcache 0.5.6 on a CPU-only torch 2.13.0.
set -euo pipefail

VENV="${LMCACHE_VENV:-$HOME/.cache/kvtier/lmcache-venv}"
PY="${PYTHON:-python3}"

check() {
    "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
import sys
ok = md.version("lmcache") == "0.5.6" and md.version("torch").startswith("2.13.0")
if ok:
    import torch
    ok = torch.version.cuda is None
sys.exit(0 if ok else 1)
PYEOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "lmcache 0.5.6 + torch 2.13.0 (CPU) already installed in $VENV"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Pin the CPU build explicitly so pip cannot pick a CUDA torch 2.13.0 from an index
# (on this machine the +cpu wheel lies in the pip find-links dir /opt/wheels).
"$VENV/bin/pip" install "torch==2.13.0+cpu"
# lmcache does not pin torch, so the CPU torch installed above is kept.
"$VENV/bin/pip" install "lmcache==0.5.6"

if ! check; then
    echo "setup failed: expected lmcache 0.5.6 on CPU-only torch 2.13.0 in $VENV" >&2
    exit 1
fi
"$VENV/bin/python" -c "import torch, importlib.metadata as md; print('torch', torch.__version__, 'lmcache', md.version('lmcache'))"
echo "ok: $VENV"
