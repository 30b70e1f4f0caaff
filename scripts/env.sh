# Sourced by run.sh and test.sh: create the project's virtual environment (.venv) and install kvtier into it.
# Usage: source scripts/env.sh [EXTRAS]   e.g. "test"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVTIER_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "kvtier: creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
fi
stamp="$VENV/.kvtier-installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo "kvtier: installing kvtier${extras:+[$extras]} into $VENV" >&2
    spec="$ROOT"
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    if [ "$extras" = "test" ]; then
        # The CPU build of torch (a local wheel on our machines); a bare "torch" would pull a multi-GB CUDA build.
        "$VENV/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
    fi
    "$VENV/bin/python" -m pip install -q -e "$spec" 2>&1 | grep -v "is ignored" >&2 || true
    "$VENV/bin/python" -c "import kvtier" || { echo "kvtier: installation failed" >&2; exit 1; }
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
