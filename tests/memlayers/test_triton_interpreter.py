"""Run the Triton kernel tests on CPU under the Triton interpreter, in a subprocess.

TRITON_INTERPRET must be set before triton decorates the kernels, and must not leak into this process
(it would also switch every other Triton user, e.g. torch.compile's kernels, to the interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", exc_type=ImportError)

CASES = Path(__file__).with_name("test_triton_lookup.py")


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="with CUDA, test_triton_lookup.py runs on the GPU directly"
)
def test_triton_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=CASES.parents[2])
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{proc.stdout}\n{proc.stderr}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout
