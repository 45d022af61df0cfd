"""`python -m launch.eval` end to end on a tiny trained checkpoint, every format at once, and the
trainer's `run_tasks` entry point."""

import json

import pytest
import torch

from launch.checkpoint.load import load_checkpoint
from launch.config import EvalConfig
from launch.distributed.process_group import DistInfo
from launch.eval.__main__ import main as eval_main
from launch.eval.suite import run_tasks
from launch.eval.tasks import FORMATS
from launch.runtime.errors import UserError

from .conftest import FIXTURES

ALL_TASKS = [
    "shakespeare",
    f"text:{FIXTURES / 'text.jsonl'}",
    f"piqa:{FIXTURES / 'piqa.jsonl'}",
    f"hellaswag:{FIXTURES / 'hellaswag.jsonl'}",
    f"boolq:{FIXTURES / 'boolq.jsonl'}",
    f"arc:{FIXTURES / 'arc_easy.jsonl'}",
    f"arc:{FIXTURES / 'arc_challenge.jsonl'}",
    f"openbookqa:{FIXTURES / 'openbookqa.jsonl'}",
    f"winogrande:{FIXTURES / 'winogrande.jsonl'}",
    f"nq_open:{FIXTURES / 'nq_open.jsonl'}?shots={FIXTURES / 'nq_open_shots.jsonl'}",
    f"triviaqa:{FIXTURES / 'triviaqa.jsonl'}",
    f"facts:{FIXTURES / 'facts.jsonl'}?name=facts_recall",
]


def test_eval_cli_runs_every_format(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        f"checkpoint={tiny_run}",
        f"tasks=[{','.join(ALL_TASKS)}]",
        f"out={out}",
        "eval.limit=3",
        "eval.shots=1",
        "eval.max_new_tokens=4",
        "eval.sample_tokens=8",
        "progress=false",
    ]
    assert eval_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"].endswith("step_6") and results["step"] == 6
    names = [
        "shakespeare",
        "text",
        "piqa",
        "hellaswag",
        "boolq",
        "arc",
        "arc_2",
        "openbookqa",
        "winogrande",
        "nq_open",
        "triviaqa",
        "facts_recall",
    ]
    assert list(results["tasks"]) == names
    covered = {
        "shakespeare",
        "text",
        "piqa",
        "hellaswag",
        "boolq",
        "arc",
        "openbookqa",
        "winogrande",
        "nq_open",
        "triviaqa",
        "facts",
    }
    assert covered == set(FORMATS) | {"shakespeare"}
    t = results["tasks"]
    assert t["shakespeare"]["windows"] == 3 and t["shakespeare"]["tokens"] == 3 * 64
    assert 1 < t["shakespeare"]["ppl"] < 512 and t["shakespeare"]["bits_per_byte"] > 0
    for name in ("piqa", "hellaswag", "boolq", "arc", "arc_2", "openbookqa", "winogrande"):
        assert 0 <= t[name]["acc"] <= 1 and 0 <= t[name]["acc_norm"] <= 1
    # eval.shots=1 holds the first row out unless a shots file is given; eval.limit=3 caps the rest
    assert t["piqa"]["n"] == 3 and t["boolq"]["n"] == 2 and t["nq_open"]["n"] == 3 and t["triviaqa"]["n"] == 2
    for name in ("nq_open", "triviaqa", "facts_recall"):
        assert set(t[name]) == {"exact_match", "f1", "n"}
        rows = [json.loads(line) for line in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == t[name]["n"]
        assert (
            set(rows[0]) == {"question", "prediction", "gold", "em", "f1"}
            and "\n" not in rows[0]["prediction"]
        )
    assert not (out / "predictions" / "piqa.jsonl").exists()
    assert isinstance(results["sample"], str)
    md = (out / "results.md").read_text()
    assert "| task | metric | value | n |" in md and "| arc_2 | acc |" in md
    stdout = capsys.readouterr().out
    assert "| shakespeare | nll_per_token |" in stdout and "|  | ppl |" in stdout
    # the defaults: sampled, with the settings beside it so the sample can be reproduced
    assert "sample (temperature=0.8 top_k=50 top_p=0.95 seed=0 tokens=8): ROMEO.\n" in stdout
    # which perplexity this is, in words (the trainer's val_ppl is another one)
    note = "shakespeare: ppl {} over the first 3 windows (eval.limit=3) of the whole validation split (bundled plays)"
    assert note.format(f"{t['shakespeare']['ppl']:.4f}") in stdout
    assert results["notes"]["shakespeare"].endswith(
        "192 tokens in 3 windows of up to 64 tokens, each document starting with BOS"
    )


def test_eval_cli_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="checkpoint= is required"):
        eval_main(["tasks=[shakespeare]"])
    with pytest.raises(UserError, match="unknown format 'squad'"):
        eval_main([f"checkpoint={tiny_run}", "tasks=[squad:/x.jsonl]"])
    with pytest.raises(UserError, match=r"bad_piqa\.jsonl:2"):
        eval_main(
            [f"checkpoint={tiny_run}", f"tasks=[piqa:{FIXTURES / 'bad_piqa.jsonl'}]", "eval.sample_tokens=0"]
        )
    with pytest.raises(UserError, match="unknown key 'eval.limt'"):
        eval_main([f"checkpoint={tiny_run}", "eval.limt=3"])


def test_run_tasks_restores_train_mode_and_matches_cli_metrics(tiny_run):
    loaded = load_checkpoint(tiny_run)
    model = loaded.model.train()
    cfg = EvalConfig(limit=2, max_new_tokens=3)
    tasks = [f"piqa:{FIXTURES / 'piqa.jsonl'}", f"facts:{FIXTURES / 'facts.jsonl'}", "shakespeare"]
    results = run_tasks(model, loaded.tokenizer, tasks, cfg, DistInfo())
    assert model.training
    assert set(results) == {"piqa", "facts", "shakespeare"}
    assert results["piqa"]["n"] == 2 and results["shakespeare"]["windows"] == 2
    assert all(isinstance(v, int | float) for m in results.values() for v in m.values())
    model.eval()
    again = run_tasks(model, loaded.tokenizer, tasks, cfg, DistInfo())
    assert not model.training and again == results  # deterministic, mode left as found
    assert torch.isfinite(torch.tensor(results["shakespeare"]["nll_per_token"]))


def test_trainer_logs_eval_metrics(tiny_run):
    from launch.train.metrics import read_metrics

    rows = [r for r in read_metrics(tiny_run) if "eval/piqa/acc" in r]
    assert len(rows) == 1 and rows[0]["step"] == 6
    assert rows[0]["eval/piqa/n"] == 2 and rows[0]["eval/shakespeare/windows"] == 2
    assert rows[0]["eval/shakespeare/ppl"] > 1
