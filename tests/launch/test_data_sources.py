"""Data from where users keep it (issue 31): `datasets` directories and hub datasets (offline, through
the hub cache), large text files in bounded memory, bad text columns, stale temp directories,
SIGTERM while tokenizing, out-of-vocabulary shards, eval tasks from datasets. Every dataset is built
here; nothing touches the network (tests/conftest.py sets HF_HUB_OFFLINE=1 and a temp HF_HOME)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch.data.hub import parse_hub_name
from launch.data.shards import ShardError, open_shards
from launch.data.sources import FileSource, load_documents, open_source, text_chunks
from launch.data.tokenize_corpus import Inputs, ensure_shards, remove_stale_temps, tokenize_files, up_to_date
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.runtime.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][i % 4 :] * (i % 7 + 1))
    for i in range(40)
]
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer(train_tokenizer(DOCS * 3, path, vocab_size=320))


def _tokens(source, tok: Tokenizer, out: Path, **kw) -> np.ndarray:
    tokenize_files(Inputs(source, tok, **kw), out)
    return np.asarray(open_shards(out))


def _jsonl(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _hub_cache_dataset(name: str, splits: dict[str, list[str]]) -> None:
    """A dataset repository in the local hub cache, as `huggingface-cli download --repo-type dataset`
    leaves it: refs/main -> snapshots/SHA/data/SPLIT-*.parquet."""
    import datasets
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)
    data = root / "snapshots" / SHA / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, docs in splits.items():
        datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).to_parquet(
            str(data / f"{split}-00000-of-00001.parquet")
        )


def test_hub_spelling():
    assert parse_hub_name("hf://HuggingFaceFW/fineweb-edu") == ("HuggingFaceFW/fineweb-edu", None, None, None)
    assert parse_hub_name("hf://allenai/ai2_arc/ARC-Challenge:test@abc") == (
        "allenai/ai2_arc",
        "ARC-Challenge",
        "test",
        "abc",
    )
    with pytest.raises(UserError, match="expected hf://NAME"):
        parse_hub_name("hf://a/b/c/d")


def test_saved_dataset_and_dict_split_tokenize_like_jsonl(tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(
        str(tmp_path / "dict")
    )
    want = _tokens([_jsonl(tmp_path / "a.jsonl")], tok, tmp_path / "j")
    got = _tokens(open_source(str(tmp_path / "saved")), tok, tmp_path / "s")
    assert np.array_equal(got, want)  # save_to_disk's dataset_info.json is not read as JSON Lines
    assert np.array_equal(_tokens(open_source(str(tmp_path / "dict")), tok, tmp_path / "d"), want)
    assert load_documents(str(tmp_path / "dict"), "val") == DOCS[:5]  # default val split: validation
    assert load_documents(str(tmp_path / "dict") + ":validation", "train") == DOCS[:5]
    with pytest.raises(UserError, match="no split 'test'; splits are train, validation"):
        load_documents(str(tmp_path / "dict") + ":test", "train")
    # the index records what was read; same source: no-op; a re-saved (changed) dataset re-tokenizes
    inputs = Inputs(open_source(str(tmp_path / "saved")), tok)
    assert ensure_shards(inputs, tmp_path / "s") is False
    rec = json.loads((tmp_path / "s" / "index.json").read_text())["sources"][0]
    assert rec["dataset"] == str((tmp_path / "saved").resolve()) and rec["fingerprint"]
    shutil.rmtree(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": DOCS[:10]}).save_to_disk(str(tmp_path / "saved"))
    assert up_to_date(tmp_path / "s", Inputs(open_source(str(tmp_path / "saved")), tok)) == "sources changed"


def test_hub_dataset_offline_from_cache_streams(tmp_path, tok):
    _hub_cache_dataset("local/toy", {"train": DOCS, "validation": DOCS[:3]})
    want = _tokens([_jsonl(tmp_path / "a.jsonl")], tok, tmp_path / "j")
    src = open_source("hf://local/toy")
    assert np.array_equal(_tokens(src, tok, tmp_path / "h"), want)
    rec = json.loads((tmp_path / "h" / "index.json").read_text())["sources"][0]
    assert rec == {"dataset": "local/toy", "config": None, "split": "train", "revision": SHA}
    assert load_documents("hf://local/toy:validation", "train") == DOCS[:3]
    assert load_documents(f"hf://local/toy@{SHA}", "val") == DOCS[:3]
    with pytest.raises(UserError, match=r"no column 'body' \(data.text_field\); columns are text, id"):
        load_documents("hf://local/toy", "train", text_field="body")


def test_hub_name_not_cached_offline_is_one_line(tmp_path, tok):
    with pytest.raises(
        UserError, match="HF_HUB_OFFLINE=1.*huggingface-cli download --repo-type dataset nobody/x"
    ):
        open_source("hf://nobody/x").open()


def test_offline_hub_cli_exits_2_in_one_line(tmp_path, tok):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.tokenize", "data=hf://HuggingFaceFW/fineweb-edu", f"out={tmp_path / 'o'}",
         f"tokenizer={tok.path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "huggingface-cli download" in proc.stderr


def test_empty_dataset_and_csv(tmp_path, tok):
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no text"):
        tokenize_files(Inputs(open_source(str(tmp_path / "empty")), tok), tmp_path / "o")
    assert not list(tmp_path.glob("o*"))
    datasets.Dataset.from_dict({"text": DOCS}).to_csv(str(tmp_path / "d.csv"))
    assert load_documents(str(tmp_path / "d.csv"), "train") == DOCS


@pytest.mark.parametrize("bad", [7, ["a", "b"], None])
def test_non_string_text_is_one_line(tmp_path, bad):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "fine"}, {"text": bad}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        UserError, match=r"a.jsonl:2: column 'text' \(data.text_field\) must hold a string, got"
    ):
        load_documents(str(tmp_path / "a.jsonl"), "train")
    pq.write_table(
        pa.table({"text": [json.dumps("fine"), None] if bad is None else [None, None]}),
        tmp_path / "p.parquet",
    )
    if bad is None:
        with pytest.raises(UserError, match="p.parquet: row 2: column 'text'.*got null"):
            load_documents(str(tmp_path / "p.parquet"), "train")
    datasets.Dataset.from_dict({"text": [bad, bad]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="ds: row 1: column 'text'.*must hold a string"):
        load_documents(str(tmp_path / "ds"), "train")


def test_text_chunks_encode_like_the_whole_text(tmp_path, tok):
    text = "".join(f"{d}\n" + ("\n" if i % 5 == 0 else "") for i, d in enumerate(DOCS * 20))
    (tmp_path / "big.txt").write_text(text)
    chunks = list(text_chunks(tmp_path / "big.txt", chunk_bytes=1000))
    assert len(chunks) > 20 and "".join(chunks) == text and all(c.endswith("\n") for c in chunks[:-1])
    from launch.data import sources

    segs = list(sources._text_segments(tmp_path / "big.txt", "strict", "file", chunk_bytes=1000))
    assert len(segs) > 20 and segs[0][1] and segs[-1][2] and not any(s[1] for s in segs[1:])
    ids = [i for text_, first, last in segs for i in tok.encode_segment(text_, first, last)]
    assert ids == tok.encode_document(text)  # chunked encoding = encoding the whole file
    # a line longer than a chunk is cut before a space: still equal
    long_line = " ".join(DOCS * 5)
    (tmp_path / "long.txt").write_text(long_line)
    segs = list(sources._text_segments(tmp_path / "long.txt", "strict", "file", chunk_bytes=500))
    assert len(segs) > 3
    assert [i for s in segs for i in tok.encode_segment(*s)] == tok.encode_document(long_line)


def test_doc_separators(tmp_path):
    (tmp_path / "t.txt").write_text("one a\ntwo\n\n\nthree<|endoftext|>four\n\nfive\n")
    docs = lambda sep: list(FileSource([tmp_path / "t.txt"], doc_separator=sep).documents())  # noqa: E731
    assert docs("file") == ["one a\ntwo\n\n\nthree<|endoftext|>four\n\nfive\n"]
    assert docs("blank_line") == ["one a\ntwo", "three<|endoftext|>four", "five\n"]
    assert docs("line") == ["one a", "two", "three<|endoftext|>four", "five"]
    assert docs("<|endoftext|>") == ["one a\ntwo\n\n\nthree", "four\n\nfive\n"]
    with pytest.raises(UserError, match="doc_separator is empty"):
        docs("")


def test_tokenizer_samples_lines(tmp_path, capsys):
    lines = [f"{w} {i}" for i in range(500) for w in ("alpha beta",)]
    train_tokenizer(lines, tmp_path / "s.model", vocab_size=290, sample=150, quiet=False)
    assert "random sample of 150 of 500 lines" in capsys.readouterr().out


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path, tok):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"out.tmp-{dead.pid}").mkdir()
    (tmp_path / f"out.tmp-{os.getpid()}x").mkdir()  # not a temp name: kept
    (tmp_path / f"out.tmp-{os.getppid()}").mkdir()  # a live process's: kept
    assert remove_stale_temps(tmp_path, "out") == [tmp_path / f"out.tmp-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"out.tmp-{os.getpid()}x", f"out.tmp-{os.getppid()}"]
    )


def test_sigterm_while_tokenizing_is_one_line_and_leaves_nothing(tmp_path, tok):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"out.tmp-{dead.pid}").mkdir()  # debris of a kill -9: removed by this run
    big = tmp_path / "big.jsonl"
    _jsonl(big, DOCS * 10000)
    child = subprocess.Popen(
        [sys.executable, "-m", "launch.tokenize", f"data={big}", f"out={tmp_path / 'out'}", f"tokenizer={tok.path}",
         "workers=2", "progress=false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not list(tmp_path.glob(f"out.tmp-{child.pid}")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert "Traceback" not in err and "BrokenPipe" not in err and err.strip().count("\n") == 0, err
    assert "SIGTERM while tokenizing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


def test_shards_beyond_the_vocabulary_fail_on_open(tmp_path, tok):
    _tokens([_jsonl(tmp_path / "a.jsonl")], tok, tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["shards"][0]["max_id"] < tok.vocab_size
    open_shards(tmp_path / "s", vocab_size=tok.vocab_size)
    with pytest.raises(ShardError, match="outside the model's vocabulary of 50"):
        open_shards(tmp_path / "s", vocab_size=50)


def test_eval_tasks_from_datasets(tmp_path):
    import datasets

    from launch.eval.tasks import load_examples, parse_task_spec

    rows = {
        "goal": ["open a jar", "cut bread"],
        "sol1": ["twist", "knife"],
        "sol2": ["shout", "spoon"],
        "label": [0, 0],
    }
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "piqa")
    )
    task = parse_task_spec(f"piqa:{tmp_path / 'piqa'}")
    assert len(load_examples(task)) == 2
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / "datasets--local--piqa"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)
    (root / "snapshots" / SHA / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(
        str(root / "snapshots" / SHA / "data" / "test-00000-of-00001.parquet")
    )
    assert len(load_examples(parse_task_spec("piqa:hf://local/piqa:test"))) == 2


def test_every_source_kind_trains_end_to_end(tmp_path, tok, run):
    """One tiny run reading a hub dataset (cache, offline), a saved dataset, a DatasetDict split, CSV and a
    large-text file with a separator; each source's cached tokens equal those of the same text as JSONL."""
    import datasets

    _hub_cache_dataset("local/train", {"train": DOCS})
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(
        str(tmp_path / "d")
    )
    datasets.Dataset.from_dict({"text": DOCS}).to_csv(str(tmp_path / "c.csv"))
    (tmp_path / "t.txt").write_text("<|endoftext|>".join(DOCS))
    vocab = tok.vocab_size
    mix = f"[{{path: {tmp_path / 'saved'}, ratio: 0.2}}, {{path: {tmp_path / 'c.csv'}, ratio: 0.2}}, {{path: {tmp_path / 't.txt'}, ratio: 0.2}}]"  # noqa: E501
    run("launch.train", "config=configs/tiny.yaml", "train.steps=2", "train.final_val_sequences=2",
        "data.train=hf://local/train", f"data.val={tmp_path / 'd'}:validation", f"data.mix={mix}",
        "data.doc_separator=<|endoftext|>", f"data.tokenizer={tok.path}", f"model.vocab_size={vocab}",
        "data.seq_len=16", "data.batch_size=4", "data.val_sequences=2", f"run.dir={tmp_path / 'run'}",
        "data.tokenize_workers=1")  # fmt: skip
    want = _tokens([_jsonl(tmp_path / "a.jsonl")], tok, tmp_path / "j")
    caches = sorted((tmp_path / "run" / "data_cache").iterdir())
    assert len(caches) == 5
    for cache in caches:
        assert np.array_equal(np.asarray(open_shards(cache)), want), cache
