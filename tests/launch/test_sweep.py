"""launch.sweep: grid expansion and run names, dry output, skip/resume, collect, submitit path."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from launch.checkpoint.paths import list_checkpoints
from launch.runtime.errors import ConfigError
from launch.sweep.__main__ import main as sweep_main
from launch.sweep.collect import collect
from launch.sweep.runner import command, plan, state, waves
from launch.sweep.spec import derive_names, expand, format_value, load_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
FAST = {
    "train.steps": 4,
    "train.ckpt_every": 2,
    "train.val_every": 2,
    "train.log_every": 2,
    "data.val_sequences": 4,
}


def write_sweep(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    body = {"base": str(TINY), "out": str(tmp_path / "runs"), **body}
    path = tmp_path / name
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


# ---------------------------------------------------------------------------------------------
# Expansion and names


def test_grid_is_cartesian_product():
    sets = expand({"a.x": [1, 2], "a.y": ["p", "q", "r"]}, None)
    assert len(sets) == 6
    assert {(s["a.x"], s["a.y"]) for s in sets} == {(x, y) for x in (1, 2) for y in "pqr"}


def test_list_times_grid():
    sets = expand({"g": [1, 2]}, [{"a": 1}, {"a": 2, "b": 3}])
    assert sets == [{"a": 1, "g": 1}, {"a": 1, "g": 2}, {"a": 2, "b": 3, "g": 1}, {"a": 2, "b": 3, "g": 2}]
    assert expand(None, None) == [{}]
    with pytest.raises(ConfigError, match="grid.g must be a non-empty list"):
        expand({"g": 3}, None)


def test_names_short_safe_deterministic_unique():
    varied = [
        {"memory.layers": [1], "memory.n_keys": 16, "optim.lr": 1e-3},
        {"memory.layers": [0, 1], "memory.n_keys": 16, "optim.lr": 1e-3},
        {"memory.layers": [], "memory.n_keys": 32, "optim.lr": 1e-3},
    ]
    names = derive_names(varied)
    assert names == ["layers-1_n_keys-16", "layers-0+1_n_keys-16", "layers-none_n_keys-32"]  # lr is constant
    assert derive_names(varied) == names
    # ambiguous last components keep their parents; colliding renderings get a hash suffix
    assert derive_names([{"a.lr": 1, "b.lr": 1}, {"a.lr": 2, "b.lr": 1}]) == [
        "lr-1",
        "lr-2",
    ]  # b.lr is constant
    assert derive_names([{"a.lr": 1, "b.lr": 1}, {"a.lr": 2, "b.lr": 2}]) == [
        "a-lr-1_b-lr-1",
        "a-lr-2_b-lr-2",
    ]
    clash = derive_names([{"p": "x/y"}, {"p": "z/y"}])
    assert len(set(clash)) == 2 and all(n.startswith("p-y-") for n in clash)
    assert format_value(0.0001) == "0.0001" and format_value(True) == "true" and format_value(None) == "null"
    assert len(derive_names([{"k": "v" * 200}, {"k": "w"}])[0]) <= 80


def test_load_sweep_names_overrides_and_validation(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "overrides": FAST,
            "grid": {"model.n_layers": [1, 2]},
            "runs": [
                {"name": "dense"},
                {
                    "memory.layers": [0],
                    "memory.n_keys": 8,
                    "memory.k_dim": 16,
                    "memory.heads": 2,
                    "memory.knn": 4,
                },
            ],
        },
    )
    sweep = load_sweep(path)
    names = [r.name for r in sweep.runs]
    assert names[:2] == ["dense_n_layers-1", "dense_n_layers-2"]
    assert len(set(names)) == 4
    assert sweep.runs[2].overrides["train.steps"] == 4 and sweep.runs[2].overrides["memory.layers"] == [0]
    assert sweep.run_dir(sweep.runs[0]) == tmp_path / "runs" / "dense_n_layers-1"

    bad = write_sweep(tmp_path, {"grid": {"model.n_layrs": [1, 2]}}, "bad.yaml")
    with pytest.raises(ConfigError, match="n_layrs"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(write_sweep(tmp_path, {"gird": {}}, "bad2.yaml"))
    with pytest.raises(ConfigError, match="used twice"):
        load_sweep(
            write_sweep(tmp_path, {"runs": [{"name": "a"}, {"name": "a", "train.steps": 3}]}, "bad3.yaml")
        )
    with pytest.raises(ConfigError, match="not a run of this sweep"):
        load_sweep(
            write_sweep(
                tmp_path,
                {"runs": [{"name": "g", "grow": {"from": "nope", "strategy": "scalenet"}}]},
                "bad4.yaml",
            )
        )


def test_grow_runs_come_after_their_source(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "runs": [
                {
                    "name": "big",
                    "grow": {"from": "base", "strategy": "stack_copy", "depth": 4},
                    "train.steps": 6,
                },
                {"name": "base"},
            ]
        },
    )
    sweep = load_sweep(path)
    assert [[r.name for r in w] for w in waves(sweep, sweep.runs)] == [["base"], ["big"]]
    steps = plan(sweep, sweep.get("big"))
    assert [s.kind for s in steps] == ["grow", "train"]
    grown = sweep.run_dir("big") / "grown"
    assert (
        f"checkpoint={sweep.run_dir('base')}" in steps[0].args and "grow.strategy=stack_copy" in steps[0].args
    )
    assert f"config={grown / 'config.yaml'}" in steps[1].args and f"train.init_from={grown}" in steps[1].args


def test_dry_prints_runs_commands_and_job_parameters(tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        {
            "grid": {"optim.lr": [0.001, 0.003]},
            "eval": {"tasks": ["facts:qa.jsonl"]},
            "slurm": {"nodes": 2, "gpus_per_node": 8, "partition": "learn", "time_min": 60},
        },
    )
    assert sweep_main([f"sweep={path}", "mode=dry", "slurm.time_min=90"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "[new] lr-0.001" in out and "[new] lr-0.003" in out
    assert "-m launch.train" in out and "optim.lr=0.003" in out and "-m launch.eval" in out
    params = json.loads(out.split("slurm job parameters: ", 1)[1])
    assert params["nodes"] == 2 and params["gpus_per_node"] == 8 and params["slurm_partition"] == "learn"
    assert params["timeout_min"] == 90  # the command line wins over the file
    assert not (tmp_path / "runs").exists()  # dry touches nothing
    with pytest.raises(ConfigError, match="mode='fast'"):
        sweep_main([f"sweep={path}", "mode=fast"])
    with pytest.raises(ConfigError, match="no run or arm named nope"):
        sweep_main([f"sweep={path}", "mode=dry", "only=[nope]"])


def test_distributed_train_command_uses_torchrun(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"overrides": FAST}))
    step = plan(sweep, sweep.runs[0])[0]
    assert command(step, 1)[1:3] == ["-m", "launch.train"]
    assert command(step, 4)[1:5] == ["-m", "launch.torchrun", "--standalone", "--nproc_per_node=4"]


# ---------------------------------------------------------------------------------------------
# Running (tiny real runs on a small corpus)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> dict:
    from launch.data.facts import FactsArgs, write_corpus

    paths = write_corpus(FactsArgs(out=str(tmp_path_factory.mktemp("facts")), n_entities=20, repeats=2))
    return {"data.train": str(paths["train"]), "data.val": str(paths["train"]), "model.vocab_size": 512}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_local_skips_finished_and_resumes_unfinished(tmp_path, small_corpus, capsys):
    path = write_sweep(
        tmp_path, {"overrides": {**FAST, **small_corpus}, "grid": {"optim.lr": [0.001, 0.002]}}
    )
    sweep = load_sweep(path)
    done, partial = sweep.runs
    # `done` trained to the end and `partial` stopped at step 2, by the very commands the sweep issues
    subprocess.run(command(plan(sweep, done)[0]), check=True, cwd=REPO, env=_env(), capture_output=True)
    subprocess.run(
        [*command(plan(sweep, partial)[0]), "train.steps=2"],
        check=True,
        cwd=REPO,
        env=_env(),
        capture_output=True,
    )
    assert (state(sweep, done), state(sweep, partial)) == ("done", "partial")
    done_ckpt = list_checkpoints(sweep.run_dir(done))[-1][1]
    mtime = (done_ckpt / "trainer_state.json").stat().st_mtime_ns

    assert sweep_main([f"sweep={path}", "mode=local"]) == 0
    out = capsys.readouterr().out
    assert f"[done] {done.name}\n" in out and f"[partial] {partial.name}: running train" in out
    assert (done_ckpt / "trainer_state.json").stat().st_mtime_ns == mtime  # not retrained
    log = (sweep.run_dir(partial) / "sweep.log").read_text()
    assert "resuming from" in log and "step_2" in log
    assert [s for s, _ in list_checkpoints(sweep.run_dir(partial))][-1] == 4
    assert state(sweep, partial) == "done"
    assert not (sweep.run_dir(done) / "sweep.log").exists()

    # a second pass has nothing to do
    assert sweep_main([f"sweep={path}", "mode=local"]) == 0
    assert "running" not in capsys.readouterr().out
    written = collect(sweep)
    rows = list(csv.DictReader(written["csv"].open()))
    assert [r["run"] for r in rows] == [done.name, partial.name]
    assert all(r["steps"] == "4" and r["state"] == "done" and float(r["val_ppl"]) > 1 for r in rows)


def test_local_does_not_evaluate_a_trainer_that_exited_early(tmp_path, small_corpus, capsys, monkeypatch):
    """A trainer exits 0 after checkpointing on SIGTERM; the runner must not then evaluate that
    partial checkpoint. Simulated by a train command that stops at step 2 of 4 and exits 0."""
    from launch.sweep import runner

    path = write_sweep(
        tmp_path, {"overrides": {**FAST, **small_corpus}, "eval": {"tasks": ["facts:qa.jsonl"]}}
    )
    sweep = load_sweep(path)
    (run,) = sweep.runs
    real_command = runner.command
    monkeypatch.setattr(
        runner,
        "command",
        lambda step, *a, **k: [
            *real_command(step, *a, **k),
            *(["train.steps=2"] if step.kind == "train" else []),
        ],
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep_main([f"sweep={path}", "mode=local"]) != 0
    out = capsys.readouterr().out
    assert "training stopped at step 2 of train.steps=4" in out and "[failed]" in out
    assert [s for s, _ in list_checkpoints(sweep.run_dir(run))] == [2]
    assert not (sweep.run_dir(run) / "eval").exists()  # no eval was started
    assert "launch.eval" not in (sweep.run_dir(run) / "sweep.log").read_text()
    assert state(sweep, run) == "partial"


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit not installed")
def test_slurm_path_through_submitit_local_executor(tmp_path, small_corpus, capsys):
    path = write_sweep(
        tmp_path,
        {
            "overrides": {**small_corpus, **FAST, "train.steps": 2},
            "slurm": {"gpus_per_node": 0, "time_min": 5},
        },
    )
    sweep = load_sweep(path)
    assert sweep_main([f"sweep={path}", "mode=slurm", "cluster=local", "wait=true"]) == 0
    assert "submitted base: job" in capsys.readouterr().out
    assert state(sweep, sweep.runs[0]) == "done"
    logs = list((tmp_path / "runs" / "_slurm").rglob("*_log.out"))
    assert logs and "-m launch.train" in "".join(p.read_text() for p in logs)
    # everything done: nothing is submitted again
    assert sweep_main([f"sweep={path}", "mode=slurm", "cluster=local", "wait=true"]) == 0
    assert "submitted" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Collect (hand-made run directories)


def _fake_run(run_dir: Path, steps: int, val_loss: float, em: float | None) -> None:
    (run_dir / "checkpoints" / f"step_{steps}").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{steps}" / "trainer_state.json").write_text("{}")
    records = [
        {"step": steps // 2, "loss": 5.0, "tokens": 100 * steps // 2},
        {"step": steps // 2, "val_loss": val_loss + 1, "val_ppl": 2.718 ** (val_loss + 1)},
        {"step": steps, "loss": 4.0, "tokens": 100 * steps},
        {"step": steps, "val_loss": val_loss, "val_ppl": 2.718**val_loss},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if em is not None:
        (run_dir / "eval").mkdir()
        tasks = {"qa": {"exact_match": em, "f1": em + 0.1, "n": 50}}
        (run_dir / "eval" / "results.json").write_text(
            json.dumps({"checkpoint": str(run_dir), "step": steps, "tasks": tasks})
        )


def test_collect_tables_from_fixture_runs(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"train.steps": [10, 20]}, "eval": {"tasks": ["facts:qa.jsonl"]}})
    sweep = load_sweep(path)
    _fake_run(sweep.run_dir("steps-10"), 10, 3.0, 0.25)
    _fake_run(sweep.run_dir("steps-20"), 10, 2.5, None)  # stopped half way, not evaluated
    written = collect(sweep, tmp_path / "table")
    assert written["md"] == tmp_path / "table.md" and written["csv"] == tmp_path / "table.csv"
    rows = {r["run"]: r for r in csv.DictReader(written["csv"].open())}
    a, b = rows["steps-10"], rows["steps-20"]
    assert (a["state"], b["state"]) == ("done", "partial")
    assert a["steps"] == "10" and a["tokens"] == "1000" and float(a["loss"]) == 4.0
    assert float(a["val_loss"]) == 3.0 and float(b["val_loss"]) == 2.5  # the last validation, not the first
    assert float(a["qa/exact_match"]) == 0.25 and b["qa/exact_match"] == ""
    assert a["train.steps"] == "10"
    md = written["md"].read_text()
    assert "| run | train.steps | state |" in md and "| steps-10 | 10 | done |" in md


def test_collect_falls_back_to_the_final_validation(tmp_path):
    """A run trained with train.val_every=0 logs only final_val_*: its val columns are those."""
    path = write_sweep(tmp_path, {"grid": {"train.steps": [10, 20]}})
    sweep = load_sweep(path)
    _fake_run(sweep.run_dir("steps-10"), 10, 3.0, None)  # periodic and final: the periodic one wins
    only_final = sweep.run_dir("steps-20")
    (only_final / "checkpoints" / "step_20").mkdir(parents=True)
    (only_final / "checkpoints" / "step_20" / "trainer_state.json").write_text("{}")
    records = [
        {"step": 20, "loss": 4.0, "tokens": 2000},
        {"step": 20, "final_val_loss": 2.0, "final_val_ppl": 7.389, "final_val_sequences": 64},
    ]
    (only_final / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # the run with periodic validation also has a final record: the periodic column stays periodic
    with (sweep.run_dir("steps-10") / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 10, "final_val_loss": 9.0, "final_val_ppl": 8103.0}) + "\n")
    rows = {r["run"]: r for r in csv.DictReader(collect(sweep, tmp_path / "t")["csv"].open())}
    assert float(rows["steps-20"]["val_loss"]) == 2.0 and float(rows["steps-20"]["val_ppl"]) == 7.389
    assert float(rows["steps-10"]["val_loss"]) == 3.0


def test_collect_cli(tmp_path, capsys):
    path = write_sweep(tmp_path, {"runs": [{"name": "only"}]})
    _fake_run(tmp_path / "runs" / "only", 20, 2.0, 0.5)
    assert sweep_main(["collect", f"sweep={path}", f"out={tmp_path / 'res'}"]) == 0
    assert "wrote md" in capsys.readouterr().out
    assert "| only |" in (tmp_path / "res.md").read_text()


def test_mixed_run_trains_on_the_mixture(tmp_path, small_corpus):
    """data.mix reaches the trainer: mixing the corpus with itself at ratio 0.5 doubles the index space the trainer reports."""
    mix = [{"path": small_corpus["data.train"], "ratio": 0.5}]
    sweep = load_sweep(
        write_sweep(tmp_path, {"overrides": {**FAST, "train.steps": 2, **small_corpus, "data.mix": mix}})
    )
    (step,) = plan(sweep, sweep.runs[0])
    proc = subprocess.run(command(step), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mixed = int(proc.stdout.split("| train ")[1].split(" seqs")[0])
    from launch.data.stream import PackedSequences, tokenize_source
    from launch.data.tokenizer import Tokenizer

    tok = Tokenizer(sweep.run_dir(sweep.runs[0]) / "tokenizer.model")
    alone = len(PackedSequences(tokenize_source(small_corpus["data.train"], "train", tok, None), 32))
    assert mixed == 2 * alone
