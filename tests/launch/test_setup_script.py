"""scripts/setup.sh refuses to start on a disk too full for the environments it would build.

A full disk used to surface as pip's `OSError: [Errno 28]` halfway through an install, leaving a
half-built .venv behind. The check runs on a copy of the script in an empty folder (no .venv yet),
with `df` replaced by a stub reporting the free space we choose.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _setup_copy(tmp_path: Path, free_kb: int) -> tuple[Path, dict]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(
        "#!/bin/sh\n"
        "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo '/dev/x 100000000 1 {free_kb} 99% /'\n"
    )
    df.chmod(df.stat().st_mode | stat.S_IEXEC)
    # A python that fails loudly if the script gets past the check.
    fake_py = bin_dir / "fakepython"
    fake_py.write_text("#!/bin/sh\necho 'python was called' >&2\nexit 7\n")
    fake_py.chmod(fake_py.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(fake_py))
    return tmp_path / "scripts" / "setup.sh", env


@pytest.mark.parametrize("mode,need_mb", [("", 1200), ("dev", 4700)])
def test_setup_refuses_a_full_disk_before_building_anything(tmp_path, mode, need_mb):
    script, env = _setup_copy(tmp_path, free_kb=300 * 1024)
    res = subprocess.run(
        ["bash", str(script), *([mode] if mode else [])], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1, res.stderr
    assert "has 300 MB free" in res.stderr and f"about {need_mb} MB" in res.stderr, res.stderr
    assert "python was called" not in res.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_passes_the_check_when_the_disk_has_room(tmp_path):
    script, env = _setup_copy(tmp_path, free_kb=50 * 1024 * 1024)
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    # Past the check, the script's first step is creating the venv with $PYTHON (the stub: exit 7).
    assert res.returncode == 7 and "python was called" in res.stderr, res.stderr
    assert "MB free" not in res.stderr
