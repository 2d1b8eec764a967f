#!/usr/bin/env bash
# Install hear_msm and its CPU stack into <repo>/.venv (idempotent: re-running reuses the venv).
#
#   bash scripts/install.sh            # everything CI needs: torch pair, hear_msm[dev,plot], HEAR tools
#   HEAR_TOOLS=0 bash scripts/install.sh   # skip heareval/hearvalidator/tensorflow-cpu (saves ~1.5 GB)
#
# Environment knobs:
#   PYTHON=/path/to/python3.11   interpreter used to create the venv (default: python3.11, else python3)
#   VENV=/path/to/venv           venv location (default: <repo>/.venv)
#   HEAR_TOOLS=0|1               install the HEAR 2021 evaluation tooling (default 1)
#
# The repository root is the parent of this script's folder, whatever the current directory is.
set -euo pipefail

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export PIP_PROGRESS_BAR=off

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
HEAR_TOOLS="${HEAR_TOOLS:-1}"
REQ="$ROOT/requirements"
T0=$SECONDS

step() { printf '\n==> [%4ss] %s\n' "$((SECONDS - T0))" "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }

[[ -f "$ROOT/setup.py" ]] || { echo "install.sh: no setup.py in $ROOT" >&2; exit 1; }
cd "$ROOT"

# ---------------------------------------------------------------- interpreter + venv
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
step "repo root: $ROOT; venv: $VENV; base interpreter: $PYTHON"
"$PYTHON" - <<'EOF'
import sys
v = sys.version_info
print("base python", sys.version.split()[0])
if v < (3, 10):
    sys.exit("hear_msm needs Python >= 3.10")
if v[:2] != (3, 11):
    print("WARNING: only Python 3.11 is tested (torch 2.9.1 / tensorflow-cpu / heareval pins)")
EOF

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    step "reusing existing venv $VENV"
else
    step "creating venv $VENV"
    rm -rf "$VENV"
    run "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip)

step "upgrading pip"
run "${PIP[@]}" install --upgrade pip

# Every later install is held to requirements/constraints.txt (the full tested version set), so
# no step can move torch, torchaudio or numpy and a fresh machine resolves the same versions.
# (A -c on the command line replaces a constraint file set in pip.conf; torch is pinned anyway.)
CONSTRAINTS=(-c "$REQ/constraints.txt")

# ---------------------------------------------------------------- torch + torchaudio
# PyPI's torchaudio 2.9 wheels are CUDA builds: they need the CUDA build of torch 2.9.1 from PyPI
# (which runs fine on a CPU-only machine). No torchvision: hear_msm does not use it.
step "installing torch 2.9.1 + torchaudio 2.9.1 (PyPI CUDA build, runs on CPU; ~3 GB download)"
run "${PIP[@]}" install "${CONSTRAINTS[@]}" torch==2.9.1 torchaudio==2.9.1

# ---------------------------------------------------------------- hear_msm itself
step "installing hear_msm (editable) with extras dev,plot"
run "${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[dev,plot]"

# ---------------------------------------------------------------- HEAR 2021 tooling
if [[ "$HEAR_TOOLS" == 1 ]]; then
    # heareval pins numpy==1.19.2 and hearvalidator caps Python < 3.9, so both go in without their
    # declared deps; their real runtime deps (and tensorflow-cpu, imported at top level by both)
    # are in requirements/hear-tools.txt.
    step "installing HEAR tooling: heareval 2021.1.3, hearvalidator 2021.0.6, tensorflow-cpu"
    run "${PIP[@]}" install "${CONSTRAINTS[@]}" -r "$REQ/hear-tools.txt"
    run "${PIP[@]}" install --no-deps heareval==2021.1.3
    run "${PIP[@]}" install --no-deps --ignore-requires-python hearvalidator==2021.0.6
    # peer row of eval/ (hearbaseline.torchcrepe, weights inside the wheel); their declared deps
    # would move torch, so they go in without them (resampy is in hear-tools.txt)
    run "${PIP[@]}" install --no-deps torchcrepe==0.0.24 hearbaseline==2021.1.1
else
    step "skipping HEAR tooling (HEAR_TOOLS=$HEAR_TOOLS)"
fi

# heareval/hearvalidator declare deps we deliberately do not install (numpy==1.19.2, numba==0.48,
# tensorflow -> tensorflow-cpu, pynvml, spotty); pip check reports only those on a good install.
step "pip check (heareval/hearvalidator's own declared deps are expected to be reported)"
if ! CHECK="$("${PIP[@]}" check 2>&1)"; then
    UNEXPECTED="$(grep -vE '^(heareval|hearvalidator) ' <<<"$CHECK" || true)"
    echo "$CHECK" | sed 's/^/    /'
    [[ -z "$UNEXPECTED" ]] || echo "WARNING: unexpected dependency conflicts above (not heareval/hearvalidator)"
fi

# ---------------------------------------------------------------- verification
step "verifying the installation"
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
HEAR_TOOLS="$HEAR_TOOLS" "$PY" - <<'EOF'
import os
import numpy as np
import torch
import torchaudio

print(f"numpy {np.__version__}, torch {torch.__version__}, torchaudio {torchaudio.__version__}")
mel = torchaudio.transforms.MelSpectrogram(
    sample_rate=16000, n_fft=400, win_length=400, hop_length=160, f_min=50, f_max=8000, n_mels=80
)
spec = mel(torch.randn(1, 16000))
assert spec.shape == (1, 80, 101), spec.shape
print("torchaudio MelSpectrogram on CPU:", tuple(spec.shape))

from xlstm.blocks.mlstm.layer import mLSTMLayer, mLSTMLayerConfig

cfg = mLSTMLayerConfig(embedding_dim=32, proj_factor=2.0, qkv_proj_blocksize=4, num_heads=4,
                       conv1d_kernel_size=4, bias=False, context_length=16)
layer = mLSTMLayer(cfg)
layer.reset_parameters()
y = layer(torch.randn(2, 16, 32))
assert y.shape == (2, 16, 32) and torch.isfinite(y).all()
print("xlstm mLSTMLayer forward:", tuple(y.shape))

import hear_msm
print("hear_msm", hear_msm.__version__, "from", os.path.dirname(hear_msm.__file__))

if os.environ["HEAR_TOOLS"] == "1":
    import tensorflow as tf
    import heareval.predictions.task_predictions  # noqa: F401
    import heareval.embeddings.runner  # noqa: F401
    import pytorch_lightning as pl
    print(f"tensorflow {tf.__version__}, pytorch_lightning {pl.__version__}, heareval imports OK")
EOF
if [[ "$HEAR_TOOLS" == 1 ]]; then
    run "$VENV/bin/hear-validator" --help >/dev/null
    echo "hear-validator --help OK"
fi

step "done in $((SECONDS - T0)) s; venv at $VENV (activate: source $VENV/bin/activate)"
