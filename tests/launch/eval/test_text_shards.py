"""`text` tasks on a token shard directory (`python -m launch.tokenize`): the same perplexity as on
the text files it was made from, documents streamed one at a time, another tokenizer refused."""

import json

import pytest

from launch.checkpoint.load import load_checkpoint
from launch.config import EvalConfig
from launch.data.shards import ShardError
from launch.data.tokenize_corpus import Inputs, tokenize_files
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.distributed.process_group import DistInfo
from launch.eval import suite
from launch.eval.__main__ import main as eval_main
from launch.eval.suite import run_tasks
from launch.eval.tasks import parse_task_spec
from launch.runtime.errors import UserError

from .conftest import random_model

DOCS = [
    "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n",
    "HAMLET.\nTo be, or not to be, that is the question.",
    "Q: who wrote the play?\nA: William Shakespeare wrote it, yes or no.\n\n  Exeunt.",
    "Whether 'tis nobler in the mind to suffer ünïcode — and tabs\tthat the tokenizer lacks.",
]


def _corpus(root, tokenizer):
    """The documents as a JSON Lines file, and the shard directory made from it."""
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    shards = root / "shards"
    tokenize_files(Inputs([jsonl], tokenizer, shard_tokens=50), shards)  # several shards: documents span them
    return jsonl, shards


@pytest.mark.parametrize("cfg", [{}, {"text_stride": 3}, {"limit": 7}])
def test_shards_give_the_perplexity_of_the_text(tokenizer, tmp_path, cfg):
    jsonl, shards = _corpus(tmp_path, tokenizer)
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=8)
    eval_cfg = EvalConfig(batch_size=2, **cfg)  # chunks of 16 windows: scored in several chunks
    res = run_tasks(model, tokenizer, [f"text:{jsonl}", f"text:{shards}?name=shards"], eval_cfg, DistInfo())
    text, from_shards = res["text"], res["shards"]
    assert from_shards == text  # every metric, exactly: the same tokens in the same windows
    n_pieces = sum(len(tokenizer.encode(d)) for d in DOCS)
    if "limit" not in cfg:
        assert text["tokens"] == n_pieces and text["n"] == len(DOCS)  # pieces scored; BOS and EOS not
    assert text["ppl"] > 1


def test_documents_stream_through_the_scoring(tokenizer, tmp_path, monkeypatch):
    """Windows are scored in bounded chunks while documents are still being read."""
    _, shards = _corpus(tmp_path, tokenizer)
    calls = []
    real = suite.loglikelihoods
    monkeypatch.setattr(
        suite, "loglikelihoods", lambda m, reqs, *a, **k: calls.append(len(reqs)) or real(m, reqs, *a, **k)
    )
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=4)
    res = run_tasks(model, tokenizer, [f"text:{shards}"], EvalConfig(batch_size=1), DistInfo())["text"]
    longest = max(len(tokenizer.encode(d)) for d in DOCS)
    assert len(calls) > 1 and sum(calls) == res["windows"]
    assert max(calls) < 8 + longest / 4 + 1  # one chunk (8 batches) plus at most one document's windows


def test_another_tokenizer_is_refused_in_one_line(tokenizer, tmp_path):
    _, shards = _corpus(tmp_path, tokenizer)
    other = Tokenizer(train_tokenizer(DOCS * 5, tmp_path / "other.model", vocab_size=400))
    model = random_model(vocab=other.vocab_size, max_seq_len=8)
    with pytest.raises(ShardError, match="tokenized with another tokenizer") as e:
        run_tasks(model, other, ["shakespeare", f"text:{shards}"], EvalConfig(limit=1), DistInfo())
    assert "\n" not in str(e.value) and str(shards) in str(e.value) and "launch.tokenize" in str(e.value)


def test_a_directory_without_shards_is_refused(tmp_path):
    with pytest.raises(UserError, match="without index.json"):
        parse_task_spec(f"text:{tmp_path}")
    with pytest.raises(UserError, match="file not found"):
        parse_task_spec(f"piqa:{tmp_path}")


def test_eval_cli_on_shards_of_a_checkpoint_tokenizer(tiny_run, tmp_path):
    """End to end: a trained checkpoint scored on a JSONL file and on its shards gives one number."""
    tok = load_checkpoint(tiny_run).tokenizer
    jsonl, shards = _corpus(tmp_path, tok)
    out = tmp_path / "out"
    argv = [
        f"checkpoint={tiny_run}",
        f"tasks=[text:{jsonl},text:{shards}?name=shards]",
        f"out={out}",
        "eval.sample_tokens=0",
        "progress=false",
    ]
    assert eval_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["shards"] == results["tasks"]["text"]
    assert results["tasks"]["text"]["tokens"] == sum(len(tok.encode(d)) for d in DOCS)
    assert str(shards) in results["notes"]["shards"]
