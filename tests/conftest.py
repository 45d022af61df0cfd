"""Shared test setup: offline Hugging Face caches in a temp dir, helpers to run entry points."""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_HF_HOME = tempfile.mkdtemp(prefix="hf_home_")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_command(cmd: list[str], *, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session, so a timeout can kill torchrun AND its workers (subprocess.run's kill
    reaches only torchrun: a hung worker was left running for half an hour after its test had failed)."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as child:  # fmt: skip
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            raise AssertionError(
                f"{' '.join(cmd)} timed out after {timeout} s (every process of it killed)\n"
                f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
            ) from None
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)


def run_module(
    module: str, *args: str, env: dict | None = None, nproc: int = 1, timeout: int = 300, check: bool = True
):
    """Run `python -m module args` (or under torchrun with `nproc` processes) from the repo root."""
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            module,
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", module, *args]
    proc = run_command(cmd, cwd=REPO, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "integration: runs a command end to end or spawns processes (set automatically, tests/conftest.py); "
        'the fast unit run is `pytest -m "not integration"`',
    )
    config.addinivalue_line(
        "markers",
        "requires_native: needs the C++ CPU kernels (memlayers_cpu); skipped when they did not build, "
        "failed instead when MEMSCALE_REQUIRE_NATIVE=1 (CI sets it, so a compile error cannot hide as skips)",
    )


# A test is an integration test when it runs a command end to end (a `launch` entry point's `main`, in
# process or as a subprocess), spawns processes, or uses a fixture that does; everything else is a unit
# test. Classified here from the test's own source and fixtures, so a new test lands in the right set
# without anyone remembering a marker: `pytest -m "not integration"` is the fast unit run.
_END_TO_END = re.compile(
    r"\brun_module\(|\brun\(|subprocess\.|mp\.spawn|multiprocessing|torch\.distributed\.run|_cli\.main\(|\bmain\(\["
    r"|\b(?:train|eval|grow|sweep|convert|facts|tokenize|tokenizer)_main\("
)


def _runs_end_to_end(func) -> bool:
    try:
        return bool(_END_TO_END.search(inspect.getsource(func)))
    except (OSError, TypeError):
        return False


def _is_integration(item) -> bool:
    if item.get_closest_marker("slow") is not None or item.get_closest_marker("integration") is not None:
        return True
    if _runs_end_to_end(getattr(item, "function", None)):
        return True
    # Fixtures too (the closure: a fixture that trains a model makes every test using it end to end).
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(_runs_end_to_end(fixturedefs[-1].func) for name, fixturedefs in defs.items() if name != "run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_native") is None:
        return
    from memlayers.native import native_available

    if native_available():
        return
    if os.environ.get("MEMSCALE_REQUIRE_NATIVE", "0") not in ("", "0"):
        pytest.fail(
            "MEMSCALE_REQUIRE_NATIVE=1 but the C++ extension did not build (memlayers native_ops() is None)"
        )
    pytest.skip("C++ extension did not build")


@pytest.fixture
def run():  # not end to end by itself: `run(...)` in a test's body is what marks it (see _END_TO_END)
    return run_module


TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny dense model trained for 20 steps on the bundled corpus (shared by read-only tests)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run_module("launch.train", f"config={TINY}", f"run.dir={run_dir}")
    return run_dir
