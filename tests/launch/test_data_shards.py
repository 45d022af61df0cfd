"""Token shards: streaming sources, parallel tokenization, the shard format and its checks, the
index permutation, and the trainer's data entry point (`launch.data.build_datasets`)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import Config
from launch.data.permutation import IndexPermutation
from launch.data.shards import ShardError, TokenShards, dtype_for, open_shards
from launch.data.sources import iter_documents, resolve_files
from launch.data.stream import BatchStream, MixedSequences, PackedSequences, build_datasets, tokenize_source
from launch.data.tokenize_corpus import Inputs, ensure_shards, tokenize_files
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.distributed.process_group import DistInfo
from launch.runtime.errors import UserError
from launch.tokenize import main

REPO = Path(__file__).resolve().parents[2]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "bold",
    "jumping",
    "zebras",
]


def _doc(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + "\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer(train_tokenizer([_doc(i) for i in range(200)], path, vocab_size=300))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """60 documents as JSON Lines in three files (one gzip, one zstd)."""
    import pyarrow as pa

    d = tmp_path / "corpus"
    d.mkdir()
    docs = [_doc(i) for i in range(60)]
    lines = [json.dumps({"text": t}) + "\n" for t in docs]
    (d / "a.jsonl").write_text("".join(lines[:20]))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(lines[20:40]))
    with pa.CompressedOutputStream(str(d / "c.jsonl.zst"), "zstd") as f:
        f.write("".join(lines[40:]).encode())
    return d


def _all_docs(corpus: Path) -> list[str]:
    return list(iter_documents(resolve_files(str(corpus), "train")))


# ---------------------------------------------------------------------------------------------
# Sources


def test_sources_stream_every_format_and_compression(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _all_docs(corpus)
    assert docs == [_doc(i) for i in range(60)]
    pq.write_table(pa.table({"body": docs[:5]}), tmp_path / "p.parquet")
    assert list(iter_documents([tmp_path / "p.parquet"], text_field="body")) == docs[:5]
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b"one whole document\n\nwith lines"))
    assert list(iter_documents([tmp_path / "t.txt.gz"])) == ["one whole document\n\nwith lines"]


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        (
            "latin1.txt",
            "caf\u00e9 cr\u00e8me".encode("latin-1"),
            r"latin1.txt: not UTF-8 text at byte 3 \(0xe9\).*encoding_errors=replace",
        ),
        ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00", r"binary.txt: NUL byte at byte 7"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"bad.jsonl: not UTF-8 text at byte 25"),
        ("torn.jsonl", b'{"text": "ok"}\n{"text": \n', r"torn.jsonl:2: invalid JSON"),
        (
            "field.jsonl",
            b'{"body": "ok"}\n',
            r"field.jsonl:1: no column 'text' \(data.text_field\); columns are body",
        ),
        ("trunc.txt.gz", gzip.compress(bytes(range(32, 127)) * 50)[:-20], r"cannot read .*trunc.txt.gz"),
        ("junk.parquet", b"not parquet at all", r"cannot read .*junk.parquet as parquet"),
    ],
)
def test_bad_sources_are_one_line_errors_naming_the_file(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=match):
        list(iter_documents([tmp_path / name]))


def test_encoding_errors_replace_is_explicit(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    assert list(iter_documents([tmp_path / "latin1.txt"], encoding_errors="replace")) == ["caf\ufffd"]
    with pytest.raises(UserError, match="data.encoding_errors='ignore'"):
        list(iter_documents([tmp_path / "latin1.txt"], encoding_errors="ignore"))


def test_mixed_formats_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(UserError, match="cannot infer data.format"):
        list(iter_documents(resolve_files(str(tmp_path), "train")))


# ---------------------------------------------------------------------------------------------
# Tokenization and the shard format


def _shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "index.json"}


def test_shards_hold_every_document_and_do_not_depend_on_workers(tmp_path, corpus, tok):
    inputs = Inputs(resolve_files(str(corpus), "train"), tok, shard_tokens=500)
    one = tokenize_files(inputs, tmp_path / "w1", workers=1)
    two = tokenize_files(inputs, tmp_path / "w2", workers=2)
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w2")
    assert one["shards"] == two["shards"] and len(one["shards"]) > 2  # documents span shard files
    shards = open_shards(tmp_path / "w2")
    expected = [tok.encode_document(d) for d in _all_docs(corpus)]
    assert [d.tolist() for d in shards.documents()] == expected
    flat = np.concatenate([np.asarray(e) for e in expected])
    assert np.array_equal(np.asarray(shards), flat) and shards.dtype == np.uint16
    assert np.array_equal(shards.token_counts(tok.vocab_size), np.bincount(flat, minlength=tok.vocab_size))
    starts = np.array([0, 3, 497, 499, 1000, len(flat) - 11])  # inside, across and at shard boundaries
    assert np.array_equal(shards.windows(starts, 11), flat[starts[:, None] + np.arange(11)])


def test_rerun_is_a_noop_and_changes_are_detected(tmp_path, corpus, tok):
    out = tmp_path / "out"
    inputs = Inputs(resolve_files(str(corpus), "train"), tok)
    assert ensure_shards(inputs, out) is True
    assert ensure_shards(inputs, out) is False  # unchanged: nothing to do
    with open(corpus / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "a new document"}) + "\n")
    inputs = Inputs(resolve_files(str(corpus), "train"), tok)
    assert ensure_shards(inputs, out) is True  # a source changed
    assert open_shards(out).index["documents"] == 61
    other = Tokenizer(train_tokenizer([_doc(i) for i in range(100)], tmp_path / "o.model", vocab_size=310))
    assert ensure_shards(Inputs(inputs.files, other), out) is True  # another tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus",
        "o.model",
        "out",
    ]  # no temporary directories left


def test_failed_tokenization_leaves_nothing_behind(tmp_path, corpus, tok):
    (corpus / "z.jsonl").write_bytes(b'{"text": "fine"}\n\xfe\n')
    with pytest.raises(UserError, match="z.jsonl: not UTF-8 text at byte 17"):
        tokenize_files(Inputs(resolve_files(str(corpus), "train"), tok), tmp_path / "out", workers=2)
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_vocabulary_must_fit_the_dtype():
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    with pytest.raises(UserError, match="uint16 cannot hold a vocabulary of 70000"):
        dtype_for(70000, "uint16")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-6])


def _rewrite(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:2] = b"\xff\xff" if data[:2] != b"\xff\xff" else b"\x00\x00"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _rewrite, os.remove])
def test_damaged_shards(tmp_path, corpus, tok, damage):
    # a shard directory the user made with launch.tokenize: a one-line error
    assert (
        main([f"data={corpus}", f"out={tmp_path / 'user'}", f"tokenizer={tok.path}", "progress=false"]) == 0
    )
    damage(tmp_path / "user" / "shard_00000.bin")
    with pytest.raises(ShardError, match=r"shard_00000.bin: .*re-run python -m launch.tokenize"):
        tokenize_source(str(tmp_path / "user"), "train", tok, tmp_path / "cache")
    # the trainer's own cache: re-tokenized
    first = np.asarray(tokenize_source(str(corpus), "train", tok, tmp_path / "cache"))
    (cached,) = (tmp_path / "cache").iterdir()
    damage(cached / "shard_00000.bin")
    assert np.array_equal(np.asarray(tokenize_source(str(corpus), "train", tok, tmp_path / "cache")), first)


def test_index_from_another_tokenizer_is_refused(tmp_path, corpus, tok):
    main([f"data={corpus}", f"out={tmp_path / 'user'}", f"tokenizer={tok.path}", "progress=false"])
    other = Tokenizer(train_tokenizer([_doc(i) for i in range(100)], tmp_path / "o.model", vocab_size=310))
    with pytest.raises(ShardError, match="was tokenized with another tokenizer"):
        tokenize_source(str(tmp_path / "user"), "train", other, None)
    with pytest.raises(UserError, match="holds token shards"):  # no tokenizer can be trained from ids
        resolve_files(str(tmp_path / "user"), "train")
    (tmp_path / "user" / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="unreadable index"):
        tokenize_source(str(tmp_path / "user"), "train", tok, None)


def test_cli_is_one_line_exit_2_and_a_noop_on_rerun(tmp_path, corpus, tok):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "launch.tokenize",
        f"data={corpus}",
        f"out={tmp_path / 'out'}",
        f"tokenizer={tok.path}",
        "workers=2",
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0 and "tokens/s" in first.stdout and "tok/s" in first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "up to date" in again.stdout
    (corpus / "bad.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {corpus / 'bad.jsonl'}: not UTF-8 text at byte 0")
    )
    assert open_shards(tmp_path / "out").index["documents"] == 60  # the previous shards are intact


# ---------------------------------------------------------------------------------------------
# The permutation and the mixture at scale


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_index_permutation_is_a_seeded_bijection(n):
    p = IndexPermutation(n, [3, 0])
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(p(np.arange(n)[::-1]), out[::-1])  # a function of the index alone
    if n >= 16:
        assert not np.array_equal(out, IndexPermutation(n, [3, 1])(np.arange(n)))
        assert not np.array_equal(out, np.arange(n))
        assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.3


def test_stream_never_materialises_the_epoch_order():
    data = PackedSequences(TokenShards.in_memory(np.zeros(10, np.uint16)), 1)
    data.n = 50_000_000  # 50M windows (100B tokens at 2048): the order costs nothing to set up
    s = BatchStream(data, 8, 0, 1, 1, seed=0)
    idx = s._indices(49_999_996, 8)  # crosses into epoch 1
    assert len(set(idx[:4].tolist())) == 4 and idx.max() < 50_000_000


def _old_mixture(sources, ratios):
    """The wave-1 materialised mixture: the reference for index spaces of at most one period."""
    n = max(int(np.ceil(len(s) / r)) for s, r in zip(sources, ratios))
    counts = [max(1, round(r * n)) for r in ratios]
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
    owner = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    local = np.concatenate([np.arange(c) % len(s) for c, s in zip(counts, sources)])
    order = np.lexsort((owner, keys))
    return owner[order], local[order]


def _packed(n_seq, base=0):
    return PackedSequences((base + np.arange(n_seq * 4 + 1)).astype(np.int32), 4)


def test_mixture_over_a_period_matches_the_materialised_reference():
    sources, ratios = [_packed(500), _packed(37, 10_000)], [0.8, 0.2]
    owner, local = MixedSequences(sources, ratios).locate(np.arange(len(MixedSequences(sources, ratios))))
    ref_owner, ref_local = _old_mixture(sources, ratios)
    assert np.array_equal(owner, ref_owner) and np.array_equal(local, ref_local)


def test_mixture_beyond_a_period_covers_every_sequence_at_the_ratio(monkeypatch):
    monkeypatch.setattr(MixedSequences, "PERIOD", 64)
    mixed = MixedSequences([_packed(3000), _packed(301, 100_000)], [0.75, 0.25])
    owner, local = mixed.locate(np.arange(len(mixed)))
    assert len(mixed) % mixed.period == 0 and mixed.period <= 65
    assert abs(owner.mean() - 0.25) < 0.01
    assert set(local[owner == 0].tolist()) == set(range(3000)) and set(local[owner == 1].tolist()) == set(
        range(301)
    )
    rows = mixed.get(np.arange(0, len(mixed), 97))
    ref = torch.stack(
        [mixed.sources[k].get(np.array([j]))[0] for k, j in zip(*mixed.locate(np.arange(0, len(mixed), 97)))]
    )
    assert torch.equal(rows, ref)


# ---------------------------------------------------------------------------------------------
# The trainer's entry point


def _cfg(tmp_path, **data) -> Config:
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.train.progress = False
    cfg.data.seq_len = 16
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_build_datasets_from_a_shard_directory_and_from_files_agree(tmp_path, corpus, tok):
    main(
        [
            f"data={corpus}",
            f"out={tmp_path / 'shards'}",
            f"tokenizer={tok.path}",
            "progress=false",
            "shard_tokens=300",
        ]
    )
    from_dir = build_datasets(
        _cfg(tmp_path, train=str(tmp_path / "shards"), val=str(corpus / "a.jsonl")), tok, DistInfo()
    )
    from_files = build_datasets(
        _cfg(tmp_path, train=str(corpus), val=str(corpus / "a.jsonl"), tokenize_workers=2), tok, DistInfo()
    )
    idx = np.arange(len(from_dir.train))
    assert len(from_dir.train) == len(from_files.train) and torch.equal(
        from_dir.train.get(idx), from_files.train.get(idx)
    )
    # the unigram baseline from the stored counts equals the direct computation over the tokens
    train, val = (
        np.asarray(from_files.train.tokens.read(0, len(from_files.train.tokens))),
        np.asarray(from_files.val.tokens),
    )
    logp = np.log((np.bincount(train, minlength=tok.vocab_size) + 1.0) / (len(train) + tok.vocab_size))
    assert from_dir.unigram_ppl == pytest.approx(float(np.exp(-logp[val].mean())), rel=1e-9)
    assert isinstance(from_files.train.tokens.arrays[0], np.memmap)


def test_trainer_reads_shards_made_by_launch_tokenize(tmp_path, run):
    from launch.data.corpus import shakespeare_files

    text = tmp_path / "plays.txt"
    text.write_text("".join(p.read_text(encoding="utf-8")[:30000] for p in shakespeare_files("train")[:4]))
    tokenizer = train_tokenizer(
        [text.read_text()], tmp_path / "tok.model", vocab_size=512
    )  # configs/tiny.yaml's size
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    run("launch.tokenize", f"data={text}", f"out={shards}", f"tokenizer={tokenizer}", "workers=2")
    # no data.tokenizer: the one saved in the shard directory is used; data.val (text) goes to the run's cache
    proc = run(
        "launch.train",
        "config=configs/tiny.yaml",
        f"run.dir={run_dir}",
        "train.steps=2",
        f"data.train={shards}",
        f"data.val={text}",
    )
    assert "unigram val ppl" in proc.stdout
    assert [p.name.split("-")[0] for p in (run_dir / "data_cache").iterdir()] == ["val"]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("tokenize_workers", -1, "data.tokenize_workers=-1"),
        ("encoding_errors", "latin1", "data.encoding_errors='latin1'"),
    ],
)
def test_build_datasets_checks_its_keys(tmp_path, tok, key, value, match):
    with pytest.raises(UserError, match=match):
        build_datasets(_cfg(tmp_path, **{key: value}), tok, DistInfo())
