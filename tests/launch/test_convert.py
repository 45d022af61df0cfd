"""launch.convert / launch.hf: checkpoints <-> Hugging Face Llama directories, all offline with tiny
random models. Logits of the exported model must match ours (<= 1e-4, fp32); import then export
must reproduce every tensor bitwise; the exported tokenizer must give sentencepiece's ids."""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from launch.checkpoint.load import load_checkpoint  # noqa: E402
from launch.checkpoint.paths import resolve_checkpoint  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.convert import names  # noqa: E402
from launch.convert.export import export_checkpoint, export_model, exported_memory_layers  # noqa: E402
from launch.convert.import_hf import import_hf, write_checkpoint_dir  # noqa: E402
from launch.convert.tokenizer_json import BYTE, CONTROL, UNKNOWN, read_sp_model  # noqa: E402
from launch.models.build import build_model  # noqa: E402
from launch.models.generate import generate_ids  # noqa: E402
from launch.models.llama import apply_rope, rope_tables  # noqa: E402
from launch.runtime.errors import UserError  # noqa: E402
from tests.conftest import REPO, TINY, run_module  # noqa: E402

TOL = 1e-4
MEMORY_YAML = str(REPO / "configs" / "memory" / "tiny_memory.yaml")


@pytest.fixture(scope="module")
def sp_path(tiny_checkpoint) -> Path:
    return resolve_checkpoint(tiny_checkpoint) / "tokenizer.model"


def _random_model(argv: list[str], seed: int = 0):
    cfg = load_config(argv)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # peaked logits: greedy comparisons must not hinge on near-ties at init scale
        model.tok_embeddings.weight.mul_(20.0)
    return model.eval(), cfg


def randomise_query_norms(model, seed: int = 5) -> int:
    """Give every memory query batchnorm a non-trivial affine and running estimates (at init they
    are 1, 0, 0, 1: an export that dropped them would still match). Returns how many there were."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("query_norm") and m is not None:
                for t, (lo, hi) in zip(
                    (m.weight, m.bias, m.running_mean, m.running_var),
                    ((0.5, 1.5), (-0.5, 0.5), (-1, 1), (0.5, 2)),
                ):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
                n += 1
    return n


def _tokens(vocab: int, shape=(2, 24), seed: int = 1) -> torch.Tensor:
    return torch.randint(4, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _load_hf(path: Path, remote: bool = False):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=remote, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _assert_same_logits(ours, hf, tokens: torch.Tensor) -> None:
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g} > {TOL}"


def _assert_same_greedy(ours, hf, prompt: list[int], n: int = 6) -> None:
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert hf_out[0, len(prompt) :].tolist() == generate_ids(ours, [prompt], n)[0]


# ---------------------------------------------------------------------------------------------
# Name map and RoPE permutation


def test_rope_permutation_turns_interleaved_rope_into_rotate_half():
    """q·k with our interleaved RoPE on W equals q·k with HF's rotate_half RoPE on permuted W."""
    torch.manual_seed(0)
    heads, hd, dim, T = 2, 8, 16, 5
    x, wq, wk = torch.randn(T, dim), torch.randn(heads * hd, dim), torch.randn(heads * hd, dim)
    cos, sin = rope_tables(hd, T, 10000.0)
    q = apply_rope((x @ wq.T).view(1, T, heads, hd), cos, sin)[0]
    k = apply_rope((x @ wk.T).view(1, T, heads, hd), cos, sin)[0]

    def rotate_half_rope(t):  # HF's formulation, written out
        c, s = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
        half = torch.cat((-t[..., hd // 2 :], t[..., : hd // 2]), -1)
        return t * c + half * s

    q_hf = rotate_half_rope((x @ names.rope_to_hf(wq, heads).T).view(T, heads, hd))
    k_hf = rotate_half_rope((x @ names.rope_to_hf(wk, heads).T).view(T, heads, hd))
    ours = torch.einsum("thd,shd->hts", q, k)
    theirs = torch.einsum("thd,shd->hts", q_hf, k_hf)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(names.rope_from_hf(names.rope_to_hf(wq, heads), heads), wq)


def test_name_map_is_a_bijection_and_rejects_unknown_names():
    model, _ = _random_model([f"config={MEMORY_YAML}"])
    ours = list(model.state_dict())
    hf = [names.to_hf_name(n) for n in ours]
    assert len(set(hf)) == len(ours)
    assert [names.from_hf_name(n) for n in hf] == ours
    assert "model.memory_pools.0.values" in hf and "model.layers.1.mlp.keys" in hf
    with pytest.raises(KeyError, match="lora_A"):
        names.to_hf_name("layers.0.attention.wq.lora_A")
    with pytest.raises(KeyError, match="q_proj.bias"):
        names.from_hf_name("model.layers.0.self_attn.q_proj.bias")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_sp_model_reader_agrees_with_sentencepiece(sp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    model = read_sp_model(sp_path)
    assert len(model.pieces) == sp.get_piece_size()
    for i, (piece, score, kind) in enumerate(model.pieces):
        assert piece == sp.id_to_piece(i)
        assert score == pytest.approx(sp.get_score(i))
        assert (kind == CONTROL) == sp.is_control(i)
        assert (kind == UNKNOWN) == sp.is_unknown(i)
        assert (kind == BYTE) == sp.is_byte(i)
    assert model.normalizer_name == "identity" and model.byte_fallback and model.add_dummy_prefix
    ids = model.special_ids
    assert (ids["unk_token"], ids["bos_token"], ids["eos_token"], ids["pad_token"]) == (
        sp.unk_id(),
        sp.bos_id(),
        sp.eos_id(),
        sp.pad_id(),
    )


def _sample_texts() -> list[str]:
    from launch.data.sources import load_documents

    fixed = [
        "",
        "\n",
        " ",
        "  two leading spaces",
        "Hello\n  world 123",
        "\n\nROMEO.\nWhat, ho!\n",
        "trailing  ",
        "tabs\t\tand   spaces",
        "digits 1234567890 3.14",
        "héllo wörld ñandú",
        "日本語のテキスト",
        "emoji 😀 ok",
        "▁literal marker",
        "<s> and </s> typed as text",
        "x\n y\n\n  z",
    ]
    docs = load_documents("shakespeare", "train", "auto", "text")
    doc = docs[0] if isinstance(docs, list) else next(iter(docs))
    rng = random.Random(0)
    starts = [rng.randrange(len(doc) - 400) for _ in range(60)]
    slices = [doc[s : s + rng.randrange(1, 400)] for s in starts]
    alphabet = "ab \n\t1é日😀▁.,"
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(100)]
    return fixed + slices + noise


def test_exported_tokenizer_matches_sentencepiece_ids(sp_path, tmp_path):
    from launch.convert.tokenizer_json import save_tokenizer
    from launch.data.tokenizer import Tokenizer

    save_tokenizer(sp_path, tmp_path, model_max_length=64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer(sp_path)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )
    for text in _sample_texts():
        ids = ours.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf_tok(text)["input_ids"] == ours.encode_prompt(text), repr(text)  # BOS, as we score
        assert hf_tok.decode(ids) == ours.decode(ids), repr(text)


# ---------------------------------------------------------------------------------------------
# Export: dense (CLI), grown, memory


def test_dense_to_hf_cli_sharded_logits_generate(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf"
    run_module(
        "launch.convert", "to-hf", f"checkpoint={tiny_checkpoint}", f"out={out}", "max_shard_size=60KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded above the limit
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
    ):
        assert (out / f).is_file(), f
    assert not (out / "memory_modeling.py").exists()

    hf = _load_hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    loaded = load_checkpoint(tiny_checkpoint)
    cfg = loaded.model.cfg
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == cfg.kv_heads
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.generation_config.eos_token_id == loaded.tokenizer.eos_id
    _assert_same_logits(loaded.model, hf, _tokens(cfg.vocab_size))
    prompt = loaded.tokenizer.encode_prompt("ROMEO.\n")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("ROMEO.\n")["input_ids"] == prompt
    _assert_same_greedy(loaded.model, hf, prompt)


def grow_with_trained_adapters(model, cfg, adapter_rank: int):
    """`model` ScaleNet-grown to twice its depth, with non-zero adapters (as if trained: an export
    must fold B·A in, not drop it), and `cfg` describing it."""
    from scalenet import grow_by_strategy

    base_layers = cfg.model.n_layers
    model.layers, spec = grow_by_strategy(model.layers, "scalenet", adapter_rank=adapter_rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.05)
    cfg.grow = dataclasses.replace(cfg.grow, strategy="scalenet", base_layers=base_layers, spec=spec)
    cfg.model = dataclasses.replace(cfg.model, n_layers=len(model.layers))
    model.cfg = cfg.model
    return model, cfg


def test_grown_to_hf_is_a_plain_deeper_llama_with_adapters_merged(sp_path, tmp_path):
    model, cfg = _random_model([f"config={TINY}"])
    base_layers = cfg.model.n_layers
    model, cfg = grow_with_trained_adapters(model, cfg, adapter_rank=4)
    ckpt = tmp_path / "grown"
    write_checkpoint_dir(model, cfg, sp_path, ckpt, overwrite=False, source="test")
    tokens = _tokens(cfg.model.vocab_size)
    with torch.no_grad():
        expected = model(tokens)

    out = export_checkpoint(ckpt, tmp_path / "hf")
    hf = _load_hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_hidden_layers == 2 * base_layers
    with torch.no_grad():
        assert (hf(tokens).logits - expected).abs().max().item() <= TOL
    weights = load_file(str(out / "model.safetensors"))
    # Position 2 reuses block 0 ("stack"): equal weights would mean the adapter was dropped.
    q0, q2 = (weights[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 2))
    assert not torch.equal(q0, q2)
    shared = load_checkpoint(ckpt).model.layers
    assert shared[0].attention.wq.weight is shared[2].attention.wq.weight  # tied in ours, unshared in HF


@pytest.mark.parametrize("shared, query_bn", [(True, False), (False, True)])
def test_memory_to_hf_remote_code_logits_and_generate(sp_path, tmp_path, shared, query_bn):
    model, cfg = _random_model(
        [
            f"config={MEMORY_YAML}",
            "memory.layers=[0,1]",
            f"memory.shared={shared}",
            "memory.qk_norm=true",
            f"memory.query_batchnorm={query_bn}",
        ]
    )
    assert randomise_query_norms(model) == (2 if query_bn else 0)
    out = export_model(model, cfg, sp_path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memory_llama" and "AutoModelForCausalLM" in config["auto_map"]
    assert config["memory_pool_ids"] == ([0, 0] if shared else [0, 1])
    hf = _load_hf(out, remote=True)
    assert len(hf.model.memory_pools) == (1 if shared else 2)
    assert hf.model.layers[1].mlp.pool is hf.model.memory_pools[0 if shared else 1]
    assert (hf.model.layers[1].mlp.query_norm is not None) == query_bn
    _assert_same_logits(model, hf, _tokens(cfg.model.vocab_size, shape=(2, 40)))
    _assert_same_greedy(model, hf, [1, 40, 41, 42])


def test_remote_code_imports_nothing_from_this_repo():
    allowed = {"math", "torch", "torch.nn", "torch.nn.functional", "transformers", "memory_configuration"}
    for fname in ("memory_configuration.py", "memory_modeling.py"):
        tree = ast.parse((REPO / "launch" / "convert" / fname).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert set(mods) <= allowed, f"{fname} imports {mods}"


# ---------------------------------------------------------------------------------------------
# Import


def _random_hf_llama(path: Path, sp_path: Path, **overrides) -> transformers.LlamaForCausalLM:
    config = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():  # norms too, so a swapped tensor cannot hide behind all-ones
            p.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    shutil.copyfile(sp_path, path / "tokenizer.model")
    return model.eval()


@pytest.mark.parametrize("tied, kv_heads", [(False, 2), (True, 4)])
def test_from_hf_then_to_hf_reproduces_every_tensor_bitwise(sp_path, tmp_path, tied, kv_heads):
    hf = _random_hf_llama(tmp_path / "hf", sp_path, tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    if tied:
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    else:  # the CLI once
        run_module("launch.convert", "from-hf", f"hf={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}")
    loaded = load_checkpoint(tmp_path / "ckpt")
    cfg = loaded.config.model
    assert (cfg.kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.ffn_dim) == (kv_heads, tied, 5e5, 96)
    assert loaded.step == 0
    _assert_same_logits(loaded.model, hf, _tokens(512))

    export_checkpoint(tmp_path / "ckpt", tmp_path / "hf2")
    before = load_file(str(tmp_path / "hf" / "model.safetensors"))
    after = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert ("lm_head.weight" in after) != tied
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_memory_model_round_trips_through_hf(sp_path, tmp_path):
    model, cfg = _random_model(
        [f"config={MEMORY_YAML}", "memory.layers=[0,1]", "memory.shared=false", "memory.query_batchnorm=true"]
    )
    assert randomise_query_norms(model) == 2
    export_model(model, cfg, sp_path, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.memory.layers == [0, 1] and not loaded.config.memory.shared
    assert loaded.config.memory.query_batchnorm
    assert exported_memory_layers(loaded.model).pool_ids == [0, 1]
    theirs = loaded.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("attention_bias", {"attention_bias": True}),
        ("mlp_bias", {"mlp_bias": True}),
        ("hidden_act", {"hidden_act": "gelu"}),
        (
            "rope_type='llama3'",
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
        ),
        ("head_dim", {"head_dim": 32}),
        ("model_type", {"model_type": "mistral"}),
    ],
)
def test_from_hf_rejects_unsupported_config_fields(sp_path, tmp_path, field, overrides):
    _random_hf_llama(tmp_path / "hf", sp_path)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **overrides}))
    with pytest.raises(UserError, match=field.replace("(", r"\(").replace("[", r"\[")):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_from_hf_without_sentencepiece_tokenizer_fails_in_one_line(sp_path, tmp_path):
    _random_hf_llama(tmp_path / "hf", sp_path)
    (tmp_path / "hf" / "tokenizer.model").unlink()
    proc = run_module(
        "launch.convert", "from-hf", f"hf={tmp_path / 'hf'}", f"out={tmp_path / 'ckpt'}", check=False
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().count("\n") == 0
        and "tokenizer.model" in proc.stderr
        and "tokenizer=" in proc.stderr
    )


def test_imported_checkpoint_trains_with_init_from(sp_path, tmp_path):
    hf = _random_hf_llama(tmp_path / "hf", sp_path)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    run_module(
        "launch.train",
        f"config={ckpt / 'config.yaml'}",
        f"train.init_from={ckpt}",
        f"run.dir={run_dir}",
        "train.steps=1",
        "data.batch_size=2",
        "data.seq_len=16",
        "data.val=null",
        "train.val_every=0",
        "train.progress=false",
    )
    trained = load_checkpoint(run_dir).model
    start = hf.model.embed_tokens.weight
    assert trained.tok_embeddings.weight.shape == start.shape
    assert not torch.equal(trained.tok_embeddings.weight, start)  # one optimizer step moved it
    assert (trained.tok_embeddings.weight - start).abs().max() < 0.05  # ...from the imported weights
