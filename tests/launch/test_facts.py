"""Synthetic fact corpus (launch.facts) and data mixing (data.mix -> launch.data.MixedSequences)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.data.facts import ATTRIBUTES, TEMPLATES, FactsArgs, entities, write_corpus
from launch.data.stream import BatchStream, MixedSequences, PackedSequences, parse_mix, train_sequences
from launch.eval.tasks import FORMATS
from launch.facts import main
from launch.runtime.errors import ConfigError, UserError

# ---------------------------------------------------------------------------------------------
# Fact corpus


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_is_deterministic_in_seed(tmp_path):
    a = write_corpus(FactsArgs(out=str(tmp_path / "a"), n_entities=20, seed=3, repeats=2))
    b = write_corpus(FactsArgs(out=str(tmp_path / "b"), n_entities=20, seed=3, repeats=2))
    c = write_corpus(FactsArgs(out=str(tmp_path / "c"), n_entities=20, seed=4, repeats=2))
    for key in ("train", "qa", "qa_seen", "facts"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert a["facts"].read_bytes() != c["facts"].read_bytes()


def test_entities_unique_and_complete():
    people = entities(200, seed=0)
    assert len({p["name"] for p in people}) == 200
    for p in people:
        assert set(p) == {"name", *ATTRIBUTES}
        assert 1900 <= int(p["birth_year"]) <= 1999


def test_train_text_holds_every_fact_and_only_training_question_templates(tmp_path):
    paths = write_corpus(FactsArgs(out=str(tmp_path), n_entities=15, seed=1, repeats=3))
    text = paths["train"].read_text()
    people = _read(paths["facts"])
    qa, seen = _read(paths["qa"]), _read(paths["qa_seen"])
    assert len(qa) == len(seen) == 15 * len(ATTRIBUTES)
    for p in people:
        assert text.count(p["name"]) >= 3 * len(ATTRIBUTES)  # every fact in every rendering
        for attr in ATTRIBUTES:
            statements = [t.format(name=p["name"], value=p[attr]) for t in TEMPLATES[attr][0]]
            assert any(s in text for s in statements), (p["name"], attr)
    truth = {(p["name"], a): p[a] for p in people for a in ATTRIBUTES}
    for row in qa:
        assert f"Q: {row['question']}" not in text, "held-out question leaked into training text"
        name = next(p["name"] for p in people if p["name"] in row["question"])
        assert row["answer"] == truth[(name, row["attribute"])]
    assert sum(f"Q: {row['question']}\nA: {row['answer']}" in text for row in seen) > len(seen) // 2


def test_templates_are_varied_and_held_out():
    for attr, (statements, train_q, held_q) in TEMPLATES.items():
        assert len(statements) >= 3, attr
        assert not set(train_q) & set(held_q), attr


def test_qa_rows_parse_as_facts_eval_format(tmp_path):
    paths = write_corpus(FactsArgs(out=str(tmp_path), n_entities=5, seed=0, repeats=1))
    parse = FORMATS["facts"].parse
    for row in _read(paths["qa"]):
        ex = parse(row)
        assert ex.answers == [row["answer"]]
        assert ex.prompt().startswith("Q: ") and ex.prompt().endswith("\nA:")


def test_cli_writes_files_and_rejects_bad_args(tmp_path, capsys):
    assert main([f"out={tmp_path}", "n_entities=4", "repeats=1"]) == 0
    written = {
        p.name for p in tmp_path.iterdir() if not p.name.startswith(".")
    }  # .launch_output.json: the output marker
    assert written == {"train.txt", "qa.jsonl", "qa_seen.jsonl", "facts.jsonl", "meta.json"}
    assert "4 entities" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="n_entities"):
        main([f"out={tmp_path}", "n_entities=0"])
    with pytest.raises(ConfigError, match="out="):
        main(["n_entities=3"])


# ---------------------------------------------------------------------------------------------
# Mixing


def _sources(seq_len: int = 8) -> tuple[PackedSequences, PackedSequences]:
    """A main source with token ids < 1000 and a small extra source with ids >= 1000."""
    rng = np.random.default_rng(0)
    main_tokens = rng.integers(0, 1000, 500 * seq_len + 1).astype(np.int32)
    extra_tokens = (1000 + np.arange(37 * seq_len + 1)).astype(np.int32)
    return PackedSequences(main_tokens, seq_len), PackedSequences(extra_tokens, seq_len)


def _is_extra(seqs: torch.Tensor) -> torch.Tensor:
    return seqs[:, 0] >= 1000


def test_mixture_ratio_and_coverage():
    main_src, extra = _sources()
    mixed = MixedSequences([main_src, extra], [0.8, 0.2])
    owner = mixed.source_of(np.arange(len(mixed)))
    assert abs(owner.mean() - 0.2) < 0.002  # exact over the index space
    # every sequence of both sources is reachable; the small one repeats
    firsts = mixed.get(np.arange(len(mixed)))[:, 0]
    assert set(firsts[firsts >= 1000].tolist()) == {1000 + 8 * j for j in range(37)}
    assert len(set(firsts[firsts < 1000].tolist())) > 0.9 * 500 * 0.63  # random first tokens, mostly distinct
    # and the stream draws sequences at the ratio, batch after batch
    stream = BatchStream(mixed, global_batch=32, rank=0, world=1, grad_accum=1, seed=5)
    frac = torch.cat([_is_extra(stream.next()[0].inputs) for _ in range(60)]).float().mean().item()
    assert abs(frac - 0.2) < 0.03


def test_mixture_matches_source_rows():
    main_src, extra = _sources()
    mixed = MixedSequences([main_src, extra], [0.7, 0.3])
    idx = np.arange(0, len(mixed), 7)
    got = mixed.get(idx)
    owner, local = mixed.locate(idx)
    for row, k, j in zip(got, owner, local):
        assert torch.equal(row, (main_src, extra)[k].get(np.array([j]))[0])


def _run(stream: BatchStream, n: int) -> list[torch.Tensor]:
    return [torch.cat([b.inputs for b in stream.next()]) for _ in range(n)]


def test_mixture_is_deterministic_resumable_and_world_size_free():
    main_src, extra = _sources()
    mixed = MixedSequences([main_src, extra], [0.75, 0.25])
    a = _run(BatchStream(mixed, 16, 0, 1, 2, seed=1), 40)  # 40 × 16 > one pass: crosses an epoch
    b = _run(BatchStream(mixed, 16, 0, 1, 2, seed=1), 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _run(BatchStream(mixed, 16, 0, 1, 2, seed=2), 3)
    assert not torch.equal(a[0], c[0])
    # resume: a fresh stream at the saved position continues exactly
    first = BatchStream(mixed, 16, 0, 1, 2, seed=1)
    _run(first, 17)
    resumed = BatchStream(MixedSequences([main_src, extra], [0.75, 0.25]), 16, 0, 1, 2, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(_run(resumed, 23), a[17:]))
    # two ranks see the two halves of the one-rank batch
    r0, r1 = BatchStream(mixed, 16, 0, 2, 1, seed=1), BatchStream(mixed, 16, 1, 2, 1, seed=1)
    for ref in a[:5]:
        assert torch.equal(torch.cat([r0.next()[0].inputs, r1.next()[0].inputs]), ref)


def test_changed_mixture_refuses_to_resume():
    main_src, extra = _sources()
    s = BatchStream(MixedSequences([main_src, extra], [0.8, 0.2]), 16, 0, 1, 1, seed=0)
    s.next()
    other = BatchStream(MixedSequences([main_src, extra], [0.5, 0.5]), 16, 0, 1, 1, seed=0)
    with pytest.raises(UserError, match="reset_data"):
        other.load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    ("mix", "match"),
    [
        ([{"path": "a.txt", "ratio": 0.6}, {"path": "b.txt", "ratio": 0.5}], "sum to 1.1"),
        ([{"path": "a.txt", "ratio": 0}], r"ratio=0 must be"),
        ([{"path": "a.txt", "ratio": "x"}], "ratio='x'"),
        ([{"ratio": 0.2}], "'path' and 'ratio'"),
        ([{"path": "a.txt", "ratio": 0.2, "weight": 1}], "unknown key"),
    ],
)
def test_parse_mix_errors(mix, match):
    with pytest.raises(UserError, match=match):
        parse_mix(mix)


def test_train_sequences_tokenizes_mix_sources(tmp_path):
    from launch.config import DataConfig
    from launch.data.tokenizer import Tokenizer, train_tokenizer

    paths = write_corpus(FactsArgs(out=str(tmp_path / "facts"), n_entities=10, seed=0, repeats=2))
    text = paths["train"].read_text()
    tok = Tokenizer(train_tokenizer([text], tmp_path / "tok.model", 400))
    main_tokens = np.asarray(tok.encode("To be, or not to be, that is the question. " * 200), dtype=np.int32)
    cfg = DataConfig(seq_len=16, mix=[{"path": str(paths["train"]), "ratio": 0.25}])
    data = train_sequences(cfg, main_tokens, tok, tmp_path / "cache")
    assert isinstance(data, MixedSequences)
    assert abs(data.source_of(np.arange(len(data))).mean() - 0.25) < 0.01
    assert isinstance(train_sequences(DataConfig(seq_len=16), main_tokens, tok, None), PackedSequences)
