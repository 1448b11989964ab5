#!/usr/bin/env bash
# bash bench/peer_llamafactory.sh [--steps 6 --repeats 3 --device cpu ...]   (flags go to bench/peer_llamafactory.py)
#
# Installs LLaMA-Factory from PyPI into its own venv (bench/.venv-llamafactory, never
# ours), then runs bench/peer_llamafactory.py: the same model, data subset and LoRA
# through `llamafactory-cli train`, and zhlora / LLaMA-Factory from the results.
#
# `pip install llamafactory` alone would replace torch with a CUDA build (~3 GB);
# so the venv gets our pinned torch first (the CPU wheel, from the index our
# requirements.txt uses), then llamafactory under a constraint that keeps that torch.
# Environment: LF_VENV (venv folder), LF_VERSION (default 0.9.5), LF_TEMPLATE.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LF_VENV:-bench/.venv-llamafactory}
LF_VERSION=${LF_VERSION:-0.9.5}
PY=${PYTHON:-python}   # our venv's python: runs the benchmark, and makes the peer's venv

if [ ! -x "$VENV/bin/llamafactory-cli" ]; then
  TORCH=$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)   # torch==2.13.0, as ours
  echo "[peer] creating $VENV: $TORCH, then llamafactory==$LF_VERSION"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install "$TORCH"
  # Pin exactly the torch now installed (2.13.0+cpu here): llamafactory may not replace it.
  "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/constraints.txt"
  "$VENV/bin/pip" install "llamafactory==$LF_VERSION" -c "$VENV/constraints.txt"
  # llamafactory also pulls torchvision and torchaudio from PyPI, builds for another torch
  # whose native libraries fail to load here ("operator torchvision::nms does not exist",
  # "Could not load this library: _torchaudio.so"). A text-only run needs neither, but
  # LLaMA-Factory imports torchaudio at start-up: remove both and leave a stand-in module.
  "$VENV/bin/pip" uninstall --yes torchvision torchaudio
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$SITE/torchaudio"
  cat > "$SITE/torchaudio/__init__.py" <<'PYEOF'
"""Stand-in written by zhlora's bench/peer_llamafactory.sh: LLaMA-Factory imports torchaudio at
start-up, but no torchaudio wheel on PyPI loads with this venv's CPU torch, and a text-only run
never calls it. Using any of its names raises."""
__version__ = "0.0.0+stand-in"


def __getattr__(name):
    raise AttributeError(f"torchaudio.{name}: torchaudio is a stand-in in this venv (text-only benchmark)")
PYEOF
  "$VENV/bin/llamafactory-cli" version
fi

# LLaMA-Factory's template for the model: SmolLM2's own when this release has it, else ChatML.
TEMPLATE=${LF_TEMPLATE:-$("$VENV/bin/python" - <<'PYEOF'
from llamafactory.data.template import TEMPLATES
print(next((t for t in ("smollm2", "smollm", "chatml") if t in TEMPLATES), "default"))
PYEOF
)}
echo "[peer] LLaMA-Factory template: $TEMPLATE"
exec "$PY" bench/peer_llamafactory.py --lf_venv "$VENV" --template "$TEMPLATE" "$@"
