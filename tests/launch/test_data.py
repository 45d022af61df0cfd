import json

import numpy as np
import pytest
import torch

from launch.data.corpus import VALIDATION_PLAYS, shakespeare_files
from launch.data.sources import load_documents, resolve_files
from launch.data.stream import BatchStream, PackedSequences, tokenize_source
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.runtime.errors import UserError


def stream(n_tokens=1000, seq=8, batch=8, rank=0, world=1, accum=1, seed=0):
    data = PackedSequences(np.arange(n_tokens, dtype=np.int32), seq)
    return BatchStream(data, batch, rank, world, accum, seed)


def global_batch(s: BatchStream) -> torch.Tensor:
    return torch.cat([torch.cat([b.inputs, b.targets[:, -1:]], 1) for b in s.next()])


def test_packing_targets_are_inputs_shifted():
    b = stream().next()[0]
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert b.inputs.shape == (8, 8)


def test_stream_is_deterministic_and_seed_dependent():
    a, b, c = stream(seed=1), stream(seed=1), stream(seed=2)
    xa, xb, xc = global_batch(a), global_batch(b), global_batch(c)
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_ranks_and_microbatches_partition_the_global_batch():
    ref = stream(batch=8)
    single = [global_batch(ref) for _ in range(5)]
    for world, accum in [(2, 1), (4, 2), (2, 4)]:
        ranks = [stream(batch=8, rank=r, world=world, accum=accum) for r in range(world)]
        for step in range(5):
            got = torch.cat([global_batch(s) for s in ranks])
            assert torch.equal(got, single[step]), (world, accum, step)


def test_epochs_visit_every_sequence_once():
    s = stream(n_tokens=8 * 10 + 1, seq=8, batch=5)
    seen = torch.cat([global_batch(s) for _ in range(2)])[:, 0] // 8
    assert sorted(seen.tolist()) == list(range(10))
    nxt = torch.cat([global_batch(s) for _ in range(2)])[:, 0] // 8
    assert sorted(nxt.tolist()) == list(range(10)) and not torch.equal(seen, nxt)


def test_state_resumes_exactly_at_another_world_size():
    a = stream(batch=8)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    expected = global_batch(a)
    ranks = [stream(batch=8, rank=r, world=2) for r in range(2)]
    for s in ranks:
        s.load_state_dict(json.loads(json.dumps(state)))
    assert torch.equal(torch.cat([global_batch(s) for s in ranks]), expected)


def test_state_mismatch_is_a_clear_error():
    s = stream(seq=8)
    with pytest.raises(UserError, match="data.seq_len"):
        s.load_state_dict({"consumed": 0, "seq_len": 16, "n_sequences": 10})


def test_batch_divisibility_error():
    with pytest.raises(UserError, match="data.batch_size=6"):
        stream(batch=6, world=4)


def test_shakespeare_split_is_by_whole_plays():
    train, val = shakespeare_files("train"), shakespeare_files("val")
    assert len(val) == len(VALIDATION_PLAYS) and len(train) > 30
    assert not {p.name for p in train} & {p.name for p in val}
    assert all(p.name.endswith("_gut.txt") for p in train + val)


def test_local_formats_through_datasets(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    assert load_documents(str(tmp_path / "a.jsonl"), "train") == ["hello world", "second doc"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x y", "z"]}), tmp_path / "b.parquet")
    assert load_documents(str(tmp_path / "b.parquet"), "train", text_field="content") == ["x y", "z"]
    with pytest.raises(UserError, match="no column 'text'"):
        load_documents(str(tmp_path / "b.parquet"), "train")


def test_hub_names_and_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="hf://allenai/c4"):
        resolve_files("allenai/c4", "train")
    with pytest.raises(UserError, match="matches no files"):
        resolve_files(str(tmp_path / "*.txt"), "train")


def test_tokenizer_round_trip_and_empty_corpus(tmp_path):
    docs = ["To be, or not to be:\nthat is the question.\n\n  Whether 'tis nobler 42"] * 50
    tok = Tokenizer(train_tokenizer(docs, tmp_path / "t.model", vocab_size=300))
    text = "ROMEO.\n  But soft! what light through yonder window breaks? 1609 \u00e9\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 300
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        tokenize_source(str(tmp_path / "empty.txt"), "train", tok, None)


def test_token_cache_is_reused_and_documents_are_bos_text_eos(tmp_path):
    (tmp_path / "c.txt").write_text("a b c d e f g\n" * 20)
    tok = Tokenizer(train_tokenizer(["a b c d e f g"] * 10, tmp_path / "t.model", vocab_size=270))
    first = tokenize_source(str(tmp_path / "c.txt"), "train", tok, tmp_path / "cache")
    (made,) = (tmp_path / "cache").iterdir()
    stamp = (made / "index.json").stat().st_mtime_ns
    again = tokenize_source(str(tmp_path / "c.txt"), "train", tok, tmp_path / "cache")
    assert (made / "index.json").stat().st_mtime_ns == stamp  # not re-tokenized
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.asarray(first).tolist() == tok.encode_document("a b c d e f g\n" * 20)
