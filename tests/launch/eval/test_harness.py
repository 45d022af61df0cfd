"""lm-evaluation-harness adapter: the three request types against our own scoring, and a local
task YAML run offline through `lm_eval.simple_evaluate`."""

import os

import pytest
import torch
import yaml

from launch.checkpoint.load import load_checkpoint
from launch.config import EvalConfig
from launch.distributed.process_group import DistInfo
from launch.eval.scoring import encode_pair, loglikelihoods, rolling_windows
from launch.eval.suite import run_tasks
from launch.models.generate import generate

from .conftest import FIXTURES, REPO, random_model

pytest.importorskip("lm_eval", reason="the lm-eval adapter needs the [eval] extra")
from lm_eval.api.instance import Instance  # noqa: E402

from launch.eval.harness import MemscaleLM  # noqa: E402


def instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm(tokenizer):
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=16)
    return MemscaleLM.from_model(model, tokenizer, batch_size="3")


def test_loglikelihood_matches_our_scoring(lm, tokenizer):
    pairs = [("Question: who?\nAnswer:", " Romeo"), ("", "To be, or not to be"), ("ROMEO. ", "But soft")]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    want = loglikelihoods(lm.model, [encode_pair(tokenizer, c, x) for c, x in pairs], batch_size=1)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-5)
    assert all(ll < 0 for ll, _ in got)


def test_loglikelihood_rolling_is_the_sum_over_windows(lm, tokenizer):
    text = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer."
    (got,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    ids = tokenizer.encode_prompt(text)
    assert len(ids) - 1 > 16  # spans several windows
    # independent reference: each token scored once, by a direct forward over its window
    total = 0.0
    for ctx, cont in rolling_windows(ids, 16):
        full = ctx + cont
        logp = lm.model(torch.tensor([full[:-1]]))[0].double().log_softmax(-1)
        total += sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert got == pytest.approx(total, abs=1e-4)


def test_generate_until_matches_generate(lm, tokenizer):
    reqs = [
        ("Q: who?\nA:", {"until": ["\n"], "max_gen_toks": 5}),
        ("ROMEO.", {"until": "e", "max_gen_toks": 7}),
    ]
    got = lm.generate_until(instances("generate_until", reqs), disable_tqdm=True)
    assert got[0] == generate(lm.model, tokenizer, "Q: who?\nA:", 5, stop=["\n"])
    assert got[1] == generate(lm.model, tokenizer, "ROMEO.", 7, stop=["e"])
    assert "e" not in got[1]


def test_constructor_needs_a_checkpoint():
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        MemscaleLM()


def test_simple_evaluate_on_local_tasks(tiny_run, tmp_path, monkeypatch):
    import lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tasks = []
    for name in ("local_piqa.yaml", "local_nq.yaml"):
        cfg = yaml.safe_load((FIXTURES / "harness" / name).read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        files["validation"] = os.fspath(REPO / files["validation"])
        tasks.append(cfg)
    out = lm_eval.simple_evaluate(
        model="memscale", model_args=f"checkpoint={tiny_run}", tasks=tasks, batch_size=4, log_samples=False
    )
    piqa, nq = out["results"]["memscale_local_piqa"], out["results"]["memscale_local_nq"]
    assert 0 <= piqa["acc,none"] <= 1 and 0 <= piqa["acc_norm,none"] <= 1
    assert 0 <= nq["exact_match,none"] <= 1
    assert out["n-samples"]["memscale_local_piqa"]["effective"] == 4
    # the shipped YAML uses our piqa prompt: the harness and launch.eval must agree exactly
    loaded = load_checkpoint(tiny_run)
    ours = run_tasks(
        loaded.model, loaded.tokenizer, [f"piqa:{FIXTURES / 'piqa.jsonl'}"], EvalConfig(), DistInfo()
    )
    assert piqa["acc,none"] == pytest.approx(ours["piqa"]["acc"])
    assert piqa["acc_norm,none"] == pytest.approx(ours["piqa"]["acc_norm"])
