"""Reliability battery, part 3 (issue 33): one test per mechanism, not per symptom.

- the safe-output rule knows runs and checkpoints (launch.runtime.outputs.protected_owner);
- a write failure inside DCP's writer is one line with the errno, and its temp dir goes;
- the lock holder removes dead writers' debris, so requeues never accumulate it;
- resume skips any unusable newest checkpoint; a step-0 restart keeps the old metrics; a reader
  racing the pruner says so."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.checkpoint import load as ckpt_load
from launch.checkpoint import manifest
from launch.checkpoint.read import usability_problem
from launch.convert import __main__ as convert_cli
from launch.eval import __main__ as eval_cli
from launch.grow import main as grow_main
from launch.runtime.errors import UserError, root_cause
from launch.runtime.run_dir import LOCK_FILE, acquire_lock
from launch.train import __main__ as train_cli

from ..conftest import REPO, TINY  # noqa: TID252
from ._reliability import cli_error, digest

QUICK = ["train.val_every=0", "train.final_val_sequences=4", "train.log_every=1"]


def _train(run_dir: Path, *args: str, env: dict | None = None, preexec=None):
    cmd = [sys.executable, "-m", "launch.train", f"config={TINY}", f"run.dir={run_dir}", *QUICK, *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, preexec_fn=preexec, timeout=300
    )


def _resign(ckpt: Path) -> None:
    manifest.write_manifest(ckpt, manifest.digest_files(ckpt, manifest.all_files(ckpt)))


def _one_error_line(stderr: str, *culprits: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, stderr
    for c in culprits:
        assert c in lines[0], (c, lines[0])
    return lines[0]


# -- 1. the safe-output rule ------------------------------------------------------------------


def test_no_command_writes_into_a_run_a_checkpoint_or_files_it_did_not_write(
    capsys, tiny_checkpoint, tmp_path
):
    run = tiny_checkpoint
    step = sorted((run / "checkpoints").iterdir())[-1]
    user = tmp_path / "mine"
    user.mkdir()
    for name in ("results.json", "results.md", "config.yaml"):
        (user / name).write_text(f"my own {name}\n")
    # Another run and another checkpoint, recognised by their markers (not the source named).
    other_run, other_ckpt = tmp_path / "other_run", tmp_path / "other_ckpt"
    other_run.mkdir(), other_ckpt.mkdir()
    (other_run / "metrics.jsonl").write_text('{"step": 1}\n')
    (other_ckpt / "trainer_state.json").write_text('{"step": 1}')
    (user / "sub").mkdir()
    before_run, before_user = digest(run), digest(tmp_path)
    slot = run / "checkpoints" / "step_99"
    cases = [
        (convert_cli.main, ["to-hf", f"checkpoint={step}", f"out={slot}"], "checkpoint slot"),
        (
            grow_main,
            ["grow.strategy=stack_copy", f"checkpoint={step}", f"out={run / 'checkpoints' / 'step_1'}"],
            "checkpoint slot",
        ),
        (
            grow_main,
            [
                "grow.strategy=stack_copy",
                f"checkpoint={step}",
                f"out={tmp_path / 'g' / 'checkpoints' / 'step_50'}",
            ],
            "checkpoint slot",
        ),
        (
            eval_cli.main,
            [f"checkpoint={step}", "tasks=[shakespeare]", f"out={other_run}"],
            "is the run directory",
        ),
        (
            eval_cli.main,
            [f"checkpoint={step}", "tasks=[shakespeare]", f"out={other_ckpt}"],
            "is the checkpoint",
        ),
        (
            eval_cli.main,
            [f"checkpoint={step}", "tasks=[shakespeare]", f"out={other_ckpt / 'x'}"],
            "inside the checkpoint",
        ),
        (eval_cli.main, [f"checkpoint={step}", "tasks=[shakespeare]", f"out={user}"], "not empty"),
        (
            eval_cli.main,
            [f"checkpoint={step}", "tasks=[shakespeare]", f"out={user}", "overwrite=true"],
            "not written by",
        ),
        (train_cli.main, [f"config={TINY}", f"run.dir={step}"], "checkpoint slot"),
        (train_cli.main, [f"config={TINY}", f"run.dir={step / 'state'}"], "inside the checkpoint"),
        (train_cli.main, [f"config={TINY}", f"run.dir={run / 'checkpoints'}"], "which the run"),
        (train_cli.main, [f"config={TINY}", f"run.dir={user}"], "config.yaml"),
    ]
    for main, argv, why in cases:
        out = next(a.split("=", 1)[1] for a in argv if a.startswith(("out=", "run.dir=")))
        cli_error(capsys, main, argv, out, why)
    after_run = digest(run)
    after_run.pop(LOCK_FILE, None), before_run.pop(LOCK_FILE, None)
    assert after_run == before_run and digest(tmp_path) == before_user
    assert not (tmp_path / "g").exists()


def test_eval_overwrite_replaces_only_its_own_output(capsys, tiny_checkpoint, tmp_path):
    out = tmp_path / "ev"
    argv = [
        f"checkpoint={tiny_checkpoint}",
        "tasks=[shakespeare]",
        "eval.limit=1",
        "progress=false",
        f"out={out}",
    ]
    with pytest.raises(SystemExit) as e:
        from launch.runtime.errors import run_cli

        run_cli(eval_cli.main, argv)
    assert e.value.code == 0 and (out / "results.json").is_file()
    cli_error(capsys, eval_cli.main, argv, str(out), "overwrite=true")  # a re-run must ask
    with pytest.raises(SystemExit) as e:
        run_cli(eval_cli.main, [*argv, "overwrite=true"])
    assert e.value.code == 0 and (out / "results.md").is_file()


# -- 2. write failures inside torch's checkpoint writer ---------------------------------------


def test_write_failure_inside_dcp_is_one_line_with_errno_and_no_temp_dir(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "train.steps=2").returncode == 0
    before = digest(run / "checkpoints")
    limit = 500_000  # the small files fit, the ~1.7 MB shard DCP writes does not: EFBIG inside DCP

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _train(run, "train.steps=4", "train.ckpt_every=2", preexec=small_files)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, str(run / "checkpoints" / "step_4"), "File too large (EFBIG)")
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert digest(run / "checkpoints") == before


def test_write_failure_while_tokenizing_is_one_line_and_leaves_no_temp_dir(tmp_path):
    """launch.tokenize (and the trainer's token cache, the same writer) past `ulimit -f`: the shard
    write's EFBIG, naming the file, exit 2; no `out.tmp-PID` left. numpy's `tofile` said only
    "N requested and M written", with no errno, and the command printed a traceback."""
    out = tmp_path / "shards"
    tok = tmp_path / "tok.model"
    assert _train(tmp_path / "run", "train.steps=1").returncode == 0
    shutil.copy(tmp_path / "run" / "tokenizer.model", tok)
    cmd = [sys.executable, "-m", "launch.tokenize", "data=shakespeare", f"out={out}", f"tokenizer={tok}",
           "progress=false", "workers=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: resource.setrlimit(
                              resource.RLIMIT_FSIZE, (100_000, 100_000)))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, "shard_00000.bin", "File too large (EFBIG)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tok.model"]


def test_a_short_write_without_errno_says_what_it_likely_met():
    """torch's file writer reports a short write as "unexpected pos N vs M" (no errno), seen with 2 ranks
    under `ulimit -f`: the line gives the rank's own error, not DCP's wrapper, and the file-size limit."""
    code = (
        "import resource\n"
        "from pathlib import Path\n"
        "from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception\n"
        "from launch.checkpoint.atomic import write_failure\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (614400, 614400))\n"
        "try:\n"
        "    raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')\n"
        "except RuntimeError as e:\n"
        "    wrapped = CheckpointException('save failed', {0: _wrap_exception(e), 1: _wrap_exception(e)})\n"
        "print(write_failure(Path('/run/checkpoints/step_2'), wrapped))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "unexpected pos 704 vs 598" in line and "CheckpointException" not in line, line
    assert "File too large (EFBIG)? files are limited to 614,400 bytes here (ulimit -f)" in line, line


def test_root_cause_unwraps_dcp_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(28, "No space left on device", "/x/__0_0.distcp")
    except OSError as e:
        wrapped = CheckpointException("save failed", {0: _wrap_exception(e)})
    cause = root_cause(wrapped)
    assert isinstance(cause, OSError) and cause.filename == "/x/__0_0.distcp"


# -- 3. debris of dead writers ----------------------------------------------------------------


def test_killed_saves_never_accumulate_temp_dirs(tmp_path):
    run = tmp_path / "run"
    for _cycle in range(2):  # each run dies halfway through writing step 2, the next one clears it
        proc = _train(run, "train.steps=2", env={"LAUNCH_FAULT": "crash_in_save:2"})
        assert proc.returncode == -9, proc.stderr
        assert len(list((run / "checkpoints").glob(".tmp_step_*"))) == 1
    proc = _train(run, "train.steps=2")
    assert proc.returncode == 0, proc.stderr
    assert not list((run / "checkpoints").glob(".tmp_step_*"))
    # Debris is cleared under the lock: a later holder removes it even when no save follows.
    (run / "checkpoints" / ".tmp_step_7_4242").mkdir()
    (run / ".config.yaml.tmp4242").write_text("torn")
    acquire_lock(run).release()
    assert (
        not (run / "checkpoints" / ".tmp_step_7_4242").exists()
        and not (run / ".config.yaml.tmp4242").exists()
    )


# -- 5. fallback on any unusable newest checkpoint --------------------------------------------


def _tamper_metadata(ck: Path) -> str:
    (ck / "state" / ".metadata").write_bytes(b"\x80\x04not a pickle")
    return ".metadata"


def _tamper_shard_and_manifest(ck: Path) -> str:
    shard = next((ck / "state").glob("*.distcp"))
    shard.unlink()
    return shard.name


def _tamper_trainer_state(ck: Path) -> str:
    (ck / "trainer_state.json").write_text('{"step": 4, "tok')
    return "trainer_state.json"


def test_output_temps_of_dead_processes_are_removed_by_the_next_writer(tmp_path):
    """grow/convert/facts/eval write into `.tmp_OUT_PID` and swap it in; a kill -9 leaves it. The next
    command writing OUT removes a dead process's temporaries and leaves a live one's alone."""
    from launch.runtime.outputs import output_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".tmp_out_{dead.pid}", tmp_path / f".old_out_{dead.pid}"]
        kept = tmp_path / f".tmp_out_{live.pid}"
        other = tmp_path / f".tmp_other_{dead.pid}"  # another output's: not this writer's place
        for d in [*stale, kept, other]:
            d.mkdir()
            (d / "weights").write_text("partial")
        with output_dir(tmp_path / "out", command="test") as tmp:
            (tmp / "result").write_text("done")
        assert (tmp_path / "out" / "result").read_text() == "done"
        assert not any(d.exists() for d in stale)
        assert kept.is_dir() and other.is_dir()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("tamper", [_tamper_metadata, _tamper_shard_and_manifest, _tamper_trainer_state])
def test_unusable_newest_checkpoint_is_skipped_for_the_newest_usable(tmp_path, tiny_checkpoint, tamper):
    ck = tmp_path / "ck"
    newest = sorted((tiny_checkpoint / "checkpoints").iterdir())[-1]
    shutil.copytree(newest, ck)
    culprit = tamper(ck)
    _resign(ck)  # the manifest matches: only the content check can tell
    problem = usability_problem(ck)
    assert problem and culprit in problem


def test_a_checkpoint_whose_step_disagrees_with_its_directory_is_unusable(tmp_path, tiny_checkpoint):
    """step_N/trainer_state.json edited to another step (and the manifest re-signed): resuming from it
    would redo or skip steps, so it is skipped like any other unusable checkpoint."""
    newest = sorted((tiny_checkpoint / "checkpoints").iterdir())[-1]
    ck = tmp_path / newest.name
    shutil.copytree(newest, ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert usability_problem(ck) is None
    state["step"] -= 1
    (ck / "trainer_state.json").write_text(json.dumps(state))
    _resign(ck)
    assert f"says step {state['step']}, in a directory named {newest.name}" in usability_problem(ck)


def test_resume_falls_back_and_a_restart_keeps_old_metrics(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=2").returncode == 0
    _tamper_metadata(run / "checkpoints" / "step_4")
    _resign(run / "checkpoints" / "step_4")
    proc = _train(run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=2")
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipping damaged checkpoint(s)" in proc.stderr and ".metadata" in proc.stderr
    assert f"resuming from {run / 'checkpoints' / 'step_2'}" in proc.stdout
    # Every checkpoint deleted (as the all-damaged error advises): the old metrics are kept aside.
    old = (run / "metrics.jsonl").read_bytes()
    shutil.rmtree(run / "checkpoints")
    proc = _train(run, "train.steps=2")
    assert proc.returncode == 0, proc.stderr
    assert "metrics.jsonl.1" in proc.stderr and (run / "metrics.jsonl.1").read_bytes() == old


def test_a_foreign_model_in_checkpoints_is_skipped(tmp_path, tiny_checkpoint):
    newest = sorted((tiny_checkpoint / "checkpoints").iterdir())[-1]
    assert usability_problem(newest, {"tok_embeddings.weight": (3, 3)}) is not None
    assert "does not match the configured model" in usability_problem(newest, {"no_such.weight": (1,)})


def _copy_as_step(src: Path, dest: Path, step: int) -> None:
    """A copy of checkpoint `src` as step_`step` (its trainer_state.json says so, the manifest matches)."""
    shutil.copytree(src, dest)
    state = json.loads((dest / "trainer_state.json").read_text())
    (dest / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
    _resign(dest)


def test_reader_racing_the_pruner(monkeypatch, tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    newest = sorted((tiny_checkpoint / "checkpoints").iterdir())[-1]
    steps = [run / "checkpoints" / "step_1", run / "checkpoints" / "step_2"]
    for n, s in enumerate(steps, start=1):
        _copy_as_step(newest, s, n)
    real = ckpt_load._load

    def pruned_once(path, *a):
        if path == steps[-1] and path.exists():  # the trainer prunes it halfway through the read
            shutil.rmtree(path)
            raise UserError(f"{path / 'tokenizer.model'}: tokenizer file not found")
        return real(path, *a)

    monkeypatch.setattr(ckpt_load, "_load", pruned_once)
    assert ckpt_load.load_checkpoint(run).path == steps[0]  # a run dir: its newest, taken again
    _copy_as_step(steps[0], steps[1], 2)
    with pytest.raises(UserError, match=r"step_2 was pruned \(deleted\) while it was being read"):
        ckpt_load.load_checkpoint(steps[1])  # a checkpoint named directly: said as it is
