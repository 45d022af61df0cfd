"""`python -m launch.grow`: grown checkpoints for every strategy, continued training, ties, exactness,
parameter overhead, CLI errors; plus the `python -m experiments.growth --quick` smoke run."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import grow as grow_cli
from launch.checkpoint.load import load_checkpoint
from launch.checkpoint.paths import latest_checkpoint
from launch.checkpoint.safe_metadata import read_metadata_file, tensor_entries
from launch.config import GrowConfig
from launch.runtime.errors import UserError
from launch.runtime.outputs import MARKER
from launch.train import __main__ as train_cli
from launch.train.metrics import read_metrics

from ..conftest import REPO, run_module  # noqa: TID252

# Strategy -> extra CLI options. The tiny base has L=2 blocks; every case grows it to 4.
CASES = {
    "scalenet": ["grow.adapter_rank=4"],
    "stack_copy": [],
    "interleave_copy": [],
    "llama_pro": ["grow.freeze_original=true"],
    "solar_dus": ["grow.m=0"],
}
BASE_DATA_CONSUMED = 20 * 8  # the tiny run: 20 steps of 8 sequences


@pytest.fixture(scope="module")
def grown(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grown")
    out = {}
    for strategy, opts in CASES.items():
        out[strategy] = root / strategy
        argv = [f"checkpoint={tiny_checkpoint}", f"out={out[strategy]}", f"grow.strategy={strategy}", *opts]
        assert grow_cli.main(argv) == 0
    return out


def summary(ckpt: Path) -> dict:
    return json.loads((ckpt / "growth.json").read_text())


def continue_training(ckpt: Path, run_dir: Path, source_run: Path, *overrides: str) -> None:
    # Reuse the source run's tokenised corpus: the cache is keyed by files and tokenizer, both unchanged.
    shutil.copytree(source_run / "data_cache", run_dir / "data_cache")
    argv = [
        f"config={ckpt}/config.yaml",
        f"run.dir={run_dir}",
        "train.steps=2",
        "train.val_every=0",
        *overrides,
    ]
    assert train_cli.main(argv) == 0


def tensor_positions(model, name: str) -> list[torch.nn.Parameter]:
    return [layer.get_parameter(name) for layer in model.layers]


# ---------------------------------------------------------------------------------------------
# Every strategy: grow, reload, continue


@pytest.mark.parametrize("strategy", list(CASES))
def test_grown_checkpoint_continues_training(grown, tiny_checkpoint, tmp_path, strategy):
    ckpt = grown[strategy]
    assert sorted(p.name for p in ckpt.iterdir() if p.name != MARKER) == [
        "COMMITTED",
        "config.yaml",
        "growth.json",
        "manifest.json",
        "state",
        "tokenizer.model",
        "trainer_state.json",
    ]
    before = load_checkpoint(ckpt)
    assert before.config.grow.strategy == strategy and before.config.grow.base_layers == 2
    assert before.config.model.n_layers == len(before.model.layers) == 4
    assert before.step == 0
    if strategy == "llama_pro":  # freeze_original: only the inserted copies (positions 1, 3) train
        for pos, layer in enumerate(before.model.layers):
            assert all(p.requires_grad == (pos in (1, 3)) for p in layer.parameters()), pos

    # one case restarts the data stream, the others continue the source's position
    reset = strategy == "stack_copy"
    run = tmp_path / "run"
    continue_training(ckpt, run, tiny_checkpoint, f"train.reset_data={reset}", "optim.lr=1e-2")
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["step"] == 2
    assert state["data"]["consumed"] == (0 if reset else BASE_DATA_CONSUMED) + 2 * 8
    first_loss = [r for r in read_metrics(run) if "loss" in r][0]["loss"]
    assert first_loss < 6.0  # starts from trained weights, not from scratch (ln 512 = 6.24)

    after = load_checkpoint(run)
    mapping = list(after.config.grow.spec["mapping"])
    for name, _ in before.model.layers[0].named_parameters():
        if "lora_" in name:
            continue
        params = tensor_positions(after.model, name)
        for pos, src in enumerate(mapping):
            first = mapping.index(src)
            shared = strategy == "scalenet"  # copy strategies own every position's tensors
            assert (params[pos] is params[first]) == (shared or pos == first), (name, pos)
    for pos in range(4):
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(before.model.layers[pos].parameters(), after.model.layers[pos].parameters())
        )
        assert changed == (strategy != "llama_pro" or pos in (1, 3)), pos


def test_grown_memory_model_with_query_batchnorm_trains_and_resumes(tmp_path):
    """A memory model grows like a dense one: adapters on the memory layer's linears get an init rule
    (they once failed with "no initialisation declared"), the value pool stays one table, and each
    position keeps its own query-batchnorm running estimates through grow, training and resume."""
    memory_yaml = REPO / "configs" / "memory" / "tiny_memory.yaml"
    base, grown_dir, run = tmp_path / "base", tmp_path / "grown", tmp_path / "run"
    common = ["train.val_every=0", "train.log_every=1", "memory.query_batchnorm=true"]
    assert (
        train_cli.main(
            [f"config={memory_yaml}", f"run.dir={base}", "train.steps=3", "train.ckpt_every=3", *common]
        )
        == 0
    )
    assert (
        grow_cli.main(
            [f"checkpoint={base}", f"out={grown_dir}", "grow.strategy=scalenet", "grow.adapter_rank=2"]
        )
        == 0
    )
    grown_model = load_checkpoint(grown_dir).model
    layer_of = {
        i: layer.feed_forward
        for i, layer in enumerate(grown_model.layers)
        if hasattr(layer.feed_forward, "query_norm")
    }
    assert sorted(layer_of) == [1, 3]  # memory in block 1 of 2; stacked: positions 1 and 3
    a, b = layer_of[1], layer_of[3]
    assert a.keys is b.keys and a.pool is b.pool and a.query_norm.weight is b.query_norm.weight
    assert a.query_norm.running_var is not b.query_norm.running_var
    torch.testing.assert_close(a.query_norm.running_var, b.query_norm.running_var)  # copied at growth
    assert not torch.equal(
        a.query_norm.running_var, torch.ones_like(a.query_norm.running_var)
    )  # trained ones

    shutil.copytree(base / "data_cache", run / "data_cache")
    argv = [
        f"config={grown_dir}/config.yaml",
        f"run.dir={run}",
        f"train.init_from={grown_dir}",
        "train.ckpt_every=2",
        *common,
    ]
    assert train_cli.main([*argv, "train.steps=2"]) == 0
    assert train_cli.main([*argv, "train.steps=4"]) == 0  # resumes from step 2
    after = load_checkpoint(run).model
    a, b = (after.layers[i].feed_forward.query_norm for i in (1, 3))
    assert not torch.equal(a.running_mean, b.running_mean)  # each position tracked its own inputs
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Checkpoint format


def stored_tensors(ckpt: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{name: shape} of the tensors a checkpoint stores, and its {alias: stored name} map."""
    entries = tensor_entries(read_metadata_file(ckpt / "state" / ".metadata"))
    shapes = {k.removeprefix("model/"): s for k, (s, _) in entries.items()}
    return shapes, json.loads((ckpt / "trainer_state.json").read_text())["aliases"]


def test_shared_weights_stored_once_and_reload_tied(grown):
    ckpt = grown["scalenet"]
    loaded = load_checkpoint(ckpt).model
    shapes, aliases = stored_tensors(ckpt)
    keys, stored = set(shapes), sum(math.prod(s) for s in shapes.values())
    # bytes on disk = unique parameters: no tensor of a reused block appears twice
    assert stored == loaded.num_params()
    for key in keys:
        if key.startswith("layers.") and "lora_" not in key:
            assert int(key.split(".")[1]) < 2, key  # block weights only under their first position
    assert aliases["layers.2.attention.wq.weight"] == "layers.0.attention.wq.weight"
    assert "layers.3.attention.wq.lora_A" in keys  # each position's adapter is its own
    for name in ("attention.wq.weight", "feed_forward.w2.weight", "attention_norm.weight"):
        p = tensor_positions(loaded, name)
        assert p[0] is p[2] and p[1] is p[3] and p[0] is not p[1]
        assert p[0].data_ptr() == p[2].data_ptr()
    a = tensor_positions(loaded, "attention.wq.lora_A")
    assert len({id(x) for x in a}) == 4


def test_copy_strategies_store_independent_tensors(grown):
    for strategy in ("stack_copy", "interleave_copy", "llama_pro", "solar_dus"):
        ckpt = grown[strategy]
        shapes, aliases = stored_tensors(ckpt)
        stored = sum(math.prod(s) for s in shapes.values())
        assert aliases == {"output.weight": "tok_embeddings.weight"}, strategy
        assert stored == load_checkpoint(ckpt).model.num_params()


def test_config_records_growth_and_continuation(grown, tiny_checkpoint):
    cfg = load_checkpoint(grown["scalenet"]).config
    assert cfg.train.init_from == str(grown["scalenet"])
    assert cfg.run.dir == str(grown["scalenet"]) + "_run"  # never the source run: that would resume it
    assert cfg.grow.spec["options"]["adapter_rank"] == 4 and cfg.grow.adapter_rank == 4
    state = json.loads((grown["scalenet"] / "trainer_state.json").read_text())
    assert state["grown_from"]["step"] == 20 and state["data"]["consumed"] == BASE_DATA_CONSUMED


# ---------------------------------------------------------------------------------------------
# What the grown model computes


def _reference_forward(base, mapping: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """The base model's own blocks applied in mapping order (a block used twice sees both uses)."""
    T = tokens.shape[1]
    rope = (base.rope_cos[:T], base.rope_sin[:T])
    h = base.tok_embeddings(tokens)
    for src in mapping:
        h = base.layers[src](h, rope)
    return base.output(base.norm(h))


def test_scalenet_at_init_computes_mapped_base_blocks_forward_and_backward(tiny_checkpoint, tmp_path):
    mapping = [1, 0, 0, 1, 1]
    out = tmp_path / "g"
    grow_cli.grow_checkpoint(
        tiny_checkpoint, out, GrowConfig(strategy="scalenet", mapping=mapping, adapter_rank=3)
    )
    base = load_checkpoint(tiny_checkpoint).model.double()
    grown_model = load_checkpoint(out).model.double()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, got = _reference_forward(base, mapping, tokens), grown_model(tokens)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    (ref.square().mean()).backward()
    (got.square().mean()).backward()
    # a shared weight's gradient sums the contributions of every position that uses it
    for name in ("attention.wq.weight", "feed_forward.w1.weight", "ffn_norm.weight"):
        for src in (0, 1):
            pos = mapping.index(src)
            torch.testing.assert_close(
                grown_model.layers[pos].get_parameter(name).grad, base.layers[src].get_parameter(name).grad
            )
    torch.testing.assert_close(grown_model.tok_embeddings.weight.grad, base.tok_embeddings.weight.grad)


def test_llama_pro_starts_at_exactly_the_base_function(grown, tiny_checkpoint):
    base = load_checkpoint(tiny_checkpoint).model
    grown_model = load_checkpoint(grown["llama_pro"]).model
    tokens = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(grown_model(tokens), base(tokens))


def test_growing_a_grown_checkpoint_merges_then_grows(grown, tmp_path):
    src = grown["scalenet"]
    out = tmp_path / "again"
    s = grow_cli.grow_checkpoint(src, out, GrowConfig(strategy="llama_pro", every=2))
    assert (s.base_layers, s.depth) == (4, 6)
    first = load_checkpoint(src).model
    again = load_checkpoint(out).model
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), first(tokens))
    assert summary(out)["merged_source_spec"]["strategy"] == "scalenet"


def test_parameter_overhead_matches_formula(grown, tiny_checkpoint, tmp_path):
    mcfg = load_checkpoint(tiny_checkpoint).config.model
    d, kv, hidden = mcfg.dim, mcfg.kv_heads * mcfg.head_dim, mcfg.hidden_dim
    shapes = {
        "wq": (d, d),
        "wk": (d, kv),
        "wv": (d, kv),
        "wo": (d, d),
        "w1": (d, hidden),
        "w2": (hidden, d),
        "w3": (d, hidden),
    }
    per_position = sum(i + o for i, o in shapes.values())  # r·(in + out) per adapted linear, r = 1
    s = summary(grown["scalenet"])
    assert s["adapter_params"] == s["added_params"] == 4 * 4 * per_position
    assert s["overhead_pct"] == pytest.approx(100 * s["added_params"] / s["base_params"])
    block = sum(i * o for i, o in shapes.values()) + 2 * d  # linears + two RMSNorms
    for strategy in ("stack_copy", "interleave_copy", "llama_pro", "solar_dus"):
        assert summary(grown[strategy])["added_params"] == 2 * block, strategy
    # targets restrict the adapted linears; untied norms add a norm pair per position
    out = tmp_path / "t"
    g = GrowConfig(strategy="scalenet", adapter_rank=2, targets=["wq", "wv"], untie_norms=True)
    t = grow_cli.grow_checkpoint(tiny_checkpoint, out, g)
    adapters = 4 * 2 * (sum(shapes["wq"]) + sum(shapes["wv"]))
    assert t.adapter_params == adapters
    assert t.added_params == adapters + (4 - 2) * 2 * d


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_input_errors(tiny_checkpoint, tmp_path):
    def err(*argv: str) -> str:
        with pytest.raises(UserError) as e:
            grow_cli.main([f"checkpoint={tiny_checkpoint}", f"out={tmp_path / 'o'}", *argv])
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    msg = err("grow.strategy=scalenett")
    assert "scalenett" in msg and all(s in msg for s in CASES)
    assert "grow.strategy= is required" in err()
    assert "mapping" in err("grow.strategy=scalenet", "grow.mapping=zigzag")
    assert "mapping[1]=7" in err("grow.strategy=scalenet", "grow.mapping=[0,7]")
    assert "grow.m" in err("grow.strategy=scalenet", "grow.m=1")
    assert "grow.spec" in err("grow.strategy=stack_copy", "grow.spec={a: 1}")
    assert "llama_pro" in err("grow.strategy=llama_pro", "grow.depth=2")
    assert "targets" in err("grow.strategy=scalenet", "grow.targets=[nope]")
    with pytest.raises(UserError, match="no checkpoint at"):
        grow_cli.main(
            [f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'o'}", "grow.strategy=scalenet"]
        )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    full = [f"checkpoint={tiny_checkpoint}", f"out={tmp_path / 'full'}", "grow.strategy=stack_copy"]
    with pytest.raises(UserError, match="overwrite=true"):
        grow_cli.main(full)
    # overwrite=true replaces only an earlier launch.grow output, never a directory it did not write
    with pytest.raises(UserError, match="not written by launch.grow"):
        grow_cli.main([*full, "overwrite=true"])
    assert (tmp_path / "full" / "keep.txt").is_file()
    (tmp_path / "full" / "keep.txt").unlink()
    assert grow_cli.main(full) == 0
    assert grow_cli.main([*full, "overwrite=true"]) == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "manifest.json").is_file()
    # through the real entry point: one line on stderr, exit status 2
    proc = run_module(
        "launch.grow",
        f"checkpoint={tiny_checkpoint}",
        f"out={tmp_path / 'p'}",
        "grow.strategy=nope",
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "valid strategies" in proc.stderr


def test_eval_runs_on_a_grown_checkpoint(grown, capsys):
    from launch.eval import __main__ as eval_cli

    assert (
        eval_cli.main(
            [
                f"checkpoint={grown['solar_dus']}",
                "tasks=[shakespeare]",
                "eval.limit=2",
                "progress=false",
                "eval.sample_tokens=0",
            ]
        )
        == 0
    )
    assert "shakespeare" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Distributed and the experiment


@pytest.mark.slow
def test_grown_model_fsdp_two_ranks_match_one(grown, tiny_checkpoint, tmp_path):
    ckpt = grown["scalenet"]
    args = [
        f"config={ckpt}/config.yaml",
        "train.steps=3",
        "train.log_every=1",
        "train.val_every=3",
        "parallel.data=fsdp",
    ]
    for name, nproc in (("one", 1), ("two", 2)):
        shutil.copytree(tiny_checkpoint / "data_cache", tmp_path / name / "data_cache")
        run_module("launch.train", *args, f"run.dir={tmp_path / name}", nproc=nproc)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 4
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (a, b)
    reloaded = load_checkpoint(tmp_path / "two").model  # the 2-rank checkpoint keeps the ties
    p = tensor_positions(reloaded, "attention.wq.weight")
    assert p[0] is p[2]


def test_growth_benchmark_quick_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.growth", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "growth.json").read_text())
    assert {"config", "runs", "scratch"} <= set(result)
    assert set(result["runs"]) == set(CASES)
    for run in [*result["runs"].values(), result["scratch"]]:
        assert run["curve"] and all(len(point) == 2 for point in run["curve"])
    table = (tmp_path / "growth.md").read_text()
    assert all(s in table for s in CASES) and "scratch" in table
    assert (tmp_path / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
