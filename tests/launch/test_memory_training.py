"""Memory layers inside the trainer: construction from config, parameter groups, training."""

import pytest
import torch

from launch.config import load_config, validate
from launch.models.build import active_params, build_model
from launch.runtime.errors import ConfigError
from launch.train.metrics import read_metrics
from launch.train.optim import build_optimizers, param_groups
from memlayers import MemoryPool, ProductKeyMemory

from ..conftest import REPO, run_module  # noqa: TID252

TINY_MEMORY = str(REPO / "configs/memory/tiny_memory.yaml")


def cfg_of(*overrides):
    cfg = load_config([f"config={TINY_MEMORY}", *overrides])
    validate(cfg)
    return cfg


def test_listed_blocks_get_memory_on_one_shared_pool():
    model = build_model(cfg_of("model.n_layers=4", "memory.layers=[1,3]"))
    kinds = [type(b.feed_forward).__name__ for b in model.layers]
    assert kinds == ["FeedForward", "ProductKeyMemory", "FeedForward", "ProductKeyMemory"]
    assert len(model.memory_pools) == 1
    assert model.layers[1].feed_forward.pool is model.layers[3].feed_forward.pool is model.memory_pools[0]
    value_keys = [k for k in model.state_dict() if k.endswith("values")]
    assert value_keys == ["memory_pools.0.values"]  # stored once however many layers read it


def test_per_layer_pools_when_not_shared():
    model = build_model(cfg_of("model.n_layers=4", "memory.layers=[0,2]", "memory.shared=false"))
    assert len(model.memory_pools) == 2
    assert model.layers[0].feed_forward.pool is not model.layers[2].feed_forward.pool


def test_values_have_their_own_group_lr_and_no_decay():
    cfg = cfg_of("memory.value_lr=0.05", "optim.lr=0.001")
    model = build_model(cfg)
    groups = param_groups(model)
    values = model.memory_pools[0].values
    assert [id(p) for p in groups["memory_values"]] == [id(values)]
    assert all(p is not values for p in groups["decay"] + groups["no_decay"])
    keys = model.layers[1].feed_forward.keys
    assert any(p is keys for p in groups["no_decay"])
    for value_opt in ("row_sparse_adam", "adamw"):  # their own optimizer (the default), or a group of AdamW's
        opts = build_optimizers(
            model, cfg_of("memory.value_lr=0.05", "optim.lr=0.001", f"memory.value_optimizer={value_opt}")
        )
        assert len(opts) == (2 if value_opt == "row_sparse_adam" else 1)
        (g,) = [g for o in opts for g in o.param_groups if g["name"] == "memory_values"]
        assert g["params"] == [values] and g["lr"] == 0.05 and g["weight_decay"] == 0.0
        assert {x["name"]: x["lr"] for x in opts[0].param_groups}["decay"] == 0.001


def test_active_params_count_value_rows_read_not_the_table():
    cfg = cfg_of()
    model = build_model(cfg)
    m = cfg.memory
    table = model.memory_pools[0].values.numel()
    assert active_params(model) == model.num_params() - table + m.heads * m.knn * cfg.model.dim


@pytest.mark.parametrize(
    "override,match",
    [
        ("memory.layers=[5]", "out of range"),
        ("memory.k_dim=15", "k_dim"),
        ("memory.knn=300", "knn"),
        ("memory.value_optimizer=sgd", "memory.value_optimizer"),
        ("memory.value_rounding=up", "memory.value_rounding"),
        ("memory.value_rounding=stochastic", "memory.value_dtype=bf16"),  # fp32 table: nothing to round
    ],
)
def test_impossible_memory_settings_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg_of(override))


def test_stochastic_rounding_reaches_the_value_optimizer():
    overrides = [
        "memory.value_optimizer=row_sparse_adam",
        "memory.value_dtype=bf16",
        "memory.value_rounding=stochastic",
        "run.seed=5",
    ]
    value_opt = build_optimizers(build_model(cfg_of(*overrides)), cfg_of(*overrides))[-1]
    assert value_opt.rounding_seed == 5


def test_two_models_in_one_process_are_independent():
    a, b = build_model(cfg_of()), build_model(cfg_of())
    assert a.memory_pools[0].values is not b.memory_pools[0].values
    with torch.no_grad():
        a.memory_pools[0].values.fill_(1.0)
    assert not torch.all(b.memory_pools[0].values == 1.0)
    assert isinstance(a.layers[1].feed_forward, ProductKeyMemory) and isinstance(
        a.memory_pools[0], MemoryPool
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # bf16 table, stochastic rounding, fused update with clipping on: the dither is a function of
        # (value, row, step), so the resumed run must still equal the straight one bit for bit
        [
            "memory.value_optimizer=row_sparse_adam",
            "memory.value_dtype=bf16",
            "memory.value_rounding=stochastic",
            "memory.clip_values=false",
        ],
    ],
)
def test_memory_model_trains_resumes_and_logs_usage(tmp_path, extra):
    args = [
        f"config={TINY_MEMORY}",
        f"run.dir={tmp_path}",
        "train.steps=8",
        "train.ckpt_every=4",
        "train.log_every=2",
        "train.val_every=0",
        *extra,
    ]
    run_module("launch.train", *args, env={"LAUNCH_FAULT": "kill:7"}, check=False)
    run_module("launch.train", *args)
    resumed = [r for r in read_metrics(tmp_path) if "loss" in r]
    straight_dir = tmp_path / "straight"
    run_module("launch.train", *args[:1], f"run.dir={straight_dir}", *args[2:])
    straight = [r for r in read_metrics(straight_dir) if "loss" in r]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    for r in straight:
        assert 0 < r["mem_slots_read_frac"] <= 1 and 0 < r["mem_usage_entropy"] <= 1


@pytest.mark.parametrize(
    "overrides,fused,deferred",
    [
        ([], True, True),  # the defaults: row_sparse_adam, clipped values, the fused update at the step
        (["optim.grad_clip=0"], True, False),  # nothing to wait for: the step runs inside the backward
        (["optim.grad_clip=1.0", "memory.clip_values=false"], True, False),
        (["optim.grad_clip=0", "train.grad_accum=2"], True, True),  # two backwards: summed at the step
        (["optim.grad_clip=0", "model.n_layers=2", "memory.layers=[0,1]"], True, True),  # two readers
        (["memory.fused_value_update=false"], False, False),
    ],
)
def test_fused_value_update_where_exact(overrides, fused, deferred):
    from memlayers.optim import RowSparseAdam

    model = build_model(cfg_of(*overrides))
    value_opt = build_optimizers(model, cfg_of(*overrides))[-1]
    assert type(value_opt) is RowSparseAdam  # the default value optimizer
    assert (value_opt.fused, value_opt.deferred) == (fused, deferred)


def test_defaults_take_the_deferred_fused_path():
    """With the defaults the lookup's backward writes no value gradient: the optimizer holds the
    lookup's inputs, the trainer's clip measures and scales the gradient through the layout."""
    from launch.distributed.grad_norm import grad_norm_and_clip
    from memlayers.shard_layout import MemoryShardLayout

    cfg = cfg_of("optim.grad_clip=1e-3")
    model = build_model(cfg)
    opts = build_optimizers(model, cfg)
    values = model.memory_pools[0].values
    state = opts[-1].state[values]  # allocated with the optimizer, not in the first step
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == values.shape and int(state["step"]) == 0
    model(torch.randint(0, 64, (2, 16))).float().pow(2).mean().backward()
    assert values.grad is None and opts[-1].has_deferred_grad(values)
    layout = MemoryShardLayout(model)
    params = [p for o in opts for g in o.param_groups for p in g["params"]]
    values_sq = float(opts[-1].deferred_grad_sq_norm(values))
    total = grad_norm_and_clip(params, cfg.optim.grad_clip, layout, cfg.memory.clip_values)
    others_sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
    assert values_sq > 0 and total == pytest.approx(
        (values_sq + others_sq / (1e-3 / total) ** 2) ** 0.5, rel=1e-6
    )
    before = values.detach().clone()
    for opt in opts:
        opt.step()
    assert not opts[-1].has_deferred_grad(values) and not torch.equal(values.detach(), before)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # clipping active at every step, two memory layers reading the pool, two micro-batches per step
        ["optim.grad_clip=0.05", "memory.layers=[0,1]", "train.grad_accum=2"],
    ],
)
def test_default_value_optimizer_equals_dense_adamw_in_the_trainer(tmp_path, extra):
    """The defaults (row_sparse_adam, fused update deferred to the clipped step) train the tiny memory
    model like memory.value_optimizer=adamw (torch's dense AdamW over the whole table): losses and
    gradient norms to float tolerance, checkpoint values too."""
    from launch.checkpoint.load import load_checkpoint

    args = [f"config={TINY_MEMORY}", "train.steps=6", "train.log_every=1", "train.val_every=0", *extra]
    run_module("launch.train", *args, f"run.dir={tmp_path / 'default'}")
    run_module("launch.train", *args, f"run.dir={tmp_path / 'adamw'}", "memory.value_optimizer=adamw")
    ours = [r for r in read_metrics(tmp_path / "default") if "loss" in r]
    ref = [r for r in read_metrics(tmp_path / "adamw") if "loss" in r]
    assert len(ours) == len(ref) == 6
    if extra:
        assert all(r["grad_norm"] > 0.05 for r in ours)  # clipping acted every step
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6)
    values = [load_checkpoint(tmp_path / d).model.memory_pools[0].values for d in ("default", "adamw")]
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-6)


def test_run_begun_with_adamw_resumes_with_adamw(tmp_path):
    """A run whose checkpoints were written with memory.value_optimizer=adamw (the old default) and is
    re-run with the new default keeps adamw (its optimizer state would not load into row_sparse_adam):
    it says so, and ends where the uninterrupted adamw run ends."""
    args = [
        f"config={TINY_MEMORY}",
        "train.steps=8",
        "train.ckpt_every=4",
        "train.log_every=1",
        "train.val_every=0",
    ]
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    adamw = "memory.value_optimizer=adamw"
    run_module(
        "launch.train", *args, f"run.dir={run_dir}", adamw, env={"LAUNCH_FAULT": "kill:7"}, check=False
    )
    resumed = run_module("launch.train", *args, f"run.dir={run_dir}")  # the new default
    assert "memory.value_optimizer=adamw" in resumed.stdout and "kept on resume" in resumed.stdout
    assert "value_optimizer: adamw" in (run_dir / "config.yaml").read_text()
    run_module("launch.train", *args, f"run.dir={straight}", adamw)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert losses[-4:] == [r["loss"] for r in read_metrics(straight) if "loss" in r][-4:]


def test_values_left_out_of_clipping_keep_their_gradient():
    """memory.clip_values=false: the global norm and the clip scale cover every other gradient."""
    from launch.distributed.grad_norm import grad_norm_and_clip
    from memlayers.shard_layout import MemoryShardLayout

    model = build_model(cfg_of("memory.value_optimizer=adamw"))
    model(torch.randint(0, 64, (2, 16))).float().pow(2).mean().backward()
    layout = MemoryShardLayout(model)
    values = {id(p) for p in layout.values()}
    params = [p for p in model.parameters() if p.grad is not None]
    before = {id(p): p.grad.clone() for p in params}
    others = [p for p in params if id(p) not in values]
    norm_others = float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in others])))
    with_values = grad_norm_and_clip(params, 0, layout)  # max_norm 0: measures, scales nothing
    total = grad_norm_and_clip(params, 1e-3, layout, clip_values=False)
    assert total == pytest.approx(norm_others, rel=1e-6) and with_values > total * (1 + 1e-4)
    for p in params:
        if id(p) in values:
            assert torch.equal(p.grad, before[id(p)])
        else:
            torch.testing.assert_close(p.grad, before[id(p)] * (1e-3 / (total + 1e-6)))


def test_fused_update_with_values_out_of_clipping_equals_unfused(tmp_path):
    """Clipping on (and active: a small max norm), values out of it: the fused run logs the unfused
    run's losses and gradient norms bit for bit."""
    args = [
        f"config={TINY_MEMORY}",
        "train.steps=6",
        "train.log_every=1",
        "train.val_every=0",
        "memory.value_optimizer=row_sparse_adam",
        "optim.grad_clip=0.05",
        "memory.clip_values=false",
    ]
    run_module("launch.train", *args, f"run.dir={tmp_path / 'fused'}")
    run_module("launch.train", *args, f"run.dir={tmp_path / 'unfused'}", "memory.fused_value_update=false")
    fused = [r for r in read_metrics(tmp_path / "fused") if "loss" in r]
    unfused = [r for r in read_metrics(tmp_path / "unfused") if "loss" in r]
    assert len(fused) == 6 and all(r["grad_norm"] > 0.05 for r in fused)  # clipping acted every step
    assert [(r["loss"], r["grad_norm"]) for r in fused] == [(r["loss"], r["grad_norm"]) for r in unfused]


@pytest.mark.slow
@pytest.mark.parametrize("mode,value_optimizer", [("fsdp", "row_sparse_adam"), ("ddp", "adamw")])
def test_replicated_values_on_two_ranks_match_one_rank(tmp_path, mode, value_optimizer):
    """parallel.memory=1 on 2 ranks: the table stays whole on each rank (not FSDP-sharded), its
    gradient — row-sparse or dense — is averaged by hand, and the run equals the 1-rank run."""
    args = [
        f"config={TINY_MEMORY}",
        "train.steps=4",
        "train.log_every=1",
        "train.val_every=0",
        f"memory.value_optimizer={value_optimizer}",
        f"parallel.data={mode}",
    ]
    run_module("launch.train", *args, f"run.dir={tmp_path / 'one'}")
    run_module("launch.train", *args, f"run.dir={tmp_path / 'two'}", nproc=2)
    one = [r for r in read_metrics(tmp_path / "one") if "loss" in r]
    two = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-5)


def test_whole_memory_model_compiles_with_no_graph_break():
    """torch.compile(fullgraph=True) of a whole memory Transformer (two memory layers on one shared pool):
    one graph, our lookup and product-key search as custom ops, no embedding_bag, outputs equal eager."""
    import gc

    from memlayers import row_sparse_adam

    gc.collect()  # dead RowSparseAdams from other tests would make reads catch up (a deliberate break)
    assert not row_sparse_adam.has_lazy_tables()
    cfg = cfg_of("memory.layers=[0,1]", "memory.lookup_impl=cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("bag_sum_cpu" in o for o in ops) and any("product_key_topk_cpu" in o for o in ops), ops
    assert not any("embedding_bag" in o for o in ops)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-5, atol=1e-5)
