"""Export our checkpoints as Hugging Face Llama directories (`python -m launch.convert to-hf`):

    dense      -> stock LlamaForCausalLM (config.json, safetensors, generation_config.json, tokenizer)
    grown      -> the same, after `scalenet.merge` (adapters folded, shared blocks copied per position)
    memory     -> a LlamaForCausalLM subclass shipped as remote code (memory_*.py + `auto_map`)

config.json is written by `transformers` itself so its format matches the installed version.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.checkpoint.paths import resolve_checkpoint
from launch.config import Config
from launch.convert import names
from launch.convert.tokenizer_json import save_tokenizer
from launch.convert.weights import write_weights
from launch.models.llama import Transformer
from launch.runtime.errors import UserError
from launch.runtime.outputs import check_output_dir, output_dir

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("memory_configuration.py", "memory_modeling.py")
AUTO_MAP = {
    "AutoConfig": "memory_configuration.MemoryLlamaConfig",
    "AutoModelForCausalLM": "memory_modeling.MemoryLlamaForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_COMMAND = "launch.convert to-hf"  # recorded in launch.runtime.outputs.MARKER


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            "Hugging Face conversion needs the [hf] extra: pip install transformers tokenizers"
        ) from None
    return transformers


@dataclass
class ExportedMemoryLayers:
    """Where the memory layers of a (plain, merged) model sit and which pool each one reads: the
    memory fields of the exported config.json. (Not `memlayers.shard_layout.MemoryShardLayout`, which is how
    the value tables are laid out over ranks.)"""

    layers: list[int]
    pool_ids: list[int]
    n_pools: int


def plain_model(model: Transformer, cfg: Config) -> Transformer:
    """A grown model with its layers merged into independent plain blocks (others unchanged)."""
    if not cfg.grow.strategy:
        return model
    from scalenet import merge

    pools = list(getattr(model, "memory_pools", []))
    model.layers = merge(model.layers, shared_objects=pools)
    return model


def exported_memory_layers(model: Transformer) -> ExportedMemoryLayers | None:
    """The memory layers of `model` and their pools; None for a model without memory layers."""
    from memlayers import ProductKeyMemory

    pools = list(getattr(model, "memory_pools", []))
    layers, pool_ids = [], []
    for i, block in enumerate(model.layers):
        ffn = block.feed_forward
        if isinstance(ffn, ProductKeyMemory):
            match = [j for j, p in enumerate(pools) if p is ffn.pool]
            if not match:
                raise UserError(
                    f"layer {i}'s memory reads a value pool the model does not own (model.memory_pools)"
                )
            layers.append(i)
            pool_ids.append(match[0])
    return ExportedMemoryLayers(layers, pool_ids, len(pools)) if layers else None


def _state_for_export(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor once, under our names (the tied output projection dropped: HF re-ties it)."""
    state = dict(model.state_dict())
    if model.output.weight is model.tok_embeddings.weight:
        state.pop("output.weight")
    return state


def hf_config(
    model: Transformer,
    cfg: Config,
    memory_layers: ExportedMemoryLayers | None,
    dtype: torch.dtype,
    bos: int,
    eos: int,
):
    """The transformers config object describing `model` (memory fields and auto_map for memory models)."""
    transformers = _require_transformers()
    m = model.cfg
    kwargs = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.dim,
        intermediate_size=m.hidden_dim,
        num_hidden_layers=len(model.layers),
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim,
        hidden_act="silu",
        max_position_embeddings=m.max_seq_len,
        initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=model.output.weight is model.tok_embeddings.weight,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos,
        eos_token_id=eos,
        architectures=["LlamaForCausalLM"],
    )
    kwargs["dtype" if _major(transformers.__version__) >= 5 else "torch_dtype"] = str(dtype).removeprefix(
        "torch."
    )
    if memory_layers is None:
        return transformers.LlamaConfig(**kwargs)
    from launch.convert.memory_configuration import MemoryLlamaConfig

    mem = cfg.memory
    memory = dict(
        memory_layers=memory_layers.layers,
        memory_pool_ids=memory_layers.pool_ids,
        memory_n_pools=memory_layers.n_pools,
        memory_n_keys=mem.n_keys,
        memory_heads=mem.heads,
        memory_k_dim=mem.k_dim,
        memory_knn=mem.knn,
        memory_v_dim=mem.v_dim or m.dim,
        memory_gated=mem.gated,
        memory_qk_norm=mem.qk_norm,
        memory_query_batchnorm=mem.query_batchnorm,
        memory_bias=True,
    )
    kwargs["architectures"] = ["MemoryLlamaForCausalLM"]
    config = MemoryLlamaConfig(**kwargs, **memory)
    config.auto_map = dict(AUTO_MAP)
    return config


def _major(version: str) -> int:
    return int(version.split(".")[0])


def write_portable_config(config, out: Path, rope_theta: float, dtype: torch.dtype) -> None:
    """config.json that every supported transformers reads the same way: 5.x writes only
    `rope_parameters` and `dtype`, which 4.x ignores (falling back to rope_theta 10000 and no
    dtype), so the 4.x fields `rope_theta` and `torch_dtype` are written alongside."""
    config.save_pretrained(str(out))
    path = out / "config.json"
    data = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    data.update(rope_theta=rope_theta, torch_dtype=name, dtype=name)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_model(
    model: Transformer,
    cfg: Config,
    tokenizer_path: str | Path,
    out: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str = "fp32",
    overwrite: bool = False,
    sources: tuple[str | Path, ...] = (),
) -> Path:
    """Write `model` (dense, grown or memory; merged in place if grown) as an HF directory.

    `out` follows launch.outputs' rules (never inside/around `sources`; overwrite=true replaces only
    an earlier export)."""
    transformers = _require_transformers()
    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = Path(out)
    model = plain_model(model, cfg)
    memory_layers = exported_memory_layers(model)
    from launch.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    state = _state_for_export(model)
    state = {k: v.detach().to("cpu", torch_dtype) for k, v in state.items()}
    hf_state = names.to_hf_state_dict(state, model.cfg.n_heads, model.cfg.kv_heads)
    config = hf_config(model, cfg, memory_layers, torch_dtype, tok.bos_id, tok.eos_id)

    with output_dir(out, command=EXPORT_COMMAND, overwrite=overwrite, sources=sources) as tmp:
        write_portable_config(config, tmp, model.cfg.rope_theta, torch_dtype)
        if memory_layers is not None:
            for fname in REMOTE_CODE:
                shutil.copyfile(HERE / fname, tmp / fname)
        write_weights(hf_state, tmp, max_shard_size)
        gen = transformers.GenerationConfig(
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id if tok.pad_id >= 0 else None,
        )
        gen.save_pretrained(str(tmp))
        save_tokenizer(tokenizer_path, tmp, model_max_length=model.cfg.max_seq_len)
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """`python -m launch.convert to-hf checkpoint=CKPT out=HFDIR`: a checkpoint (or run dir) -> HF dir."""
    from launch.checkpoint.load import load_checkpoint

    sources = (checkpoint, resolve_checkpoint(checkpoint))
    check_output_dir(out, command=EXPORT_COMMAND, overwrite=overwrite, sources=sources)  # before any loading
    loaded = load_checkpoint(checkpoint)
    return export_model(
        loaded.model,
        loaded.config,
        loaded.tokenizer.path,
        out,
        max_shard_size=max_shard_size,
        dtype=dtype,
        overwrite=overwrite,
        sources=sources,
    )
