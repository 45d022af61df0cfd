"""Export our checkpoints as Hugging Face Llama directories, and import them back.

Export (`export_checkpoint`):
    dense      -> stock LlamaForCausalLM (config.json, safetensors, generation_config.json, tokenizer)
    grown      -> the same, after `scalenet.merge` (adapters folded, shared blocks copied per position)
    memory     -> a LlamaForCausalLM subclass shipped as remote code (memory_*.py + `auto_map`)

Import (`import_hf`): a Llama (or an exported memory-Llama) directory -> a checkpoint directory that
`launch.train train.init_from=`, `launch.grow` and `launch.eval` accept. Config fields our model
cannot reproduce fail with the field's name instead of converting into a different model.

Weights are read and written with safetensors directly (never pickles, no second in-memory copy of
a random-initialised HF model); config.json is written by `transformers` itself so its format
matches the installed version.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from launch.checkpoint.paths import resolve_checkpoint
from launch.checkpoint.read import check_model_state
from launch.config import Config, MemoryConfig, to_yaml
from launch.convert import names
from launch.convert.tokenizer_json import save_tokenizer
from launch.models.llama import ModelConfig, Transformer
from launch.runtime.errors import UserError
from launch.runtime.outputs import check_output_dir, output_dir

HERE = Path(__file__).resolve().parent
REMOTE_CODE = ("memory_configuration.py", "memory_modeling.py")
AUTO_MAP = {
    "AutoConfig": "memory_configuration.MemoryLlamaConfig",
    "AutoModelForCausalLM": "memory_modeling.MemoryLlamaForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
EXPORT_COMMAND, IMPORT_COMMAND = "launch.convert to-hf", "launch.convert from-hf"  # recorded in launch.outputs.MARKER


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face conversion needs the [hf] extra: pip install transformers tokenizers") from None
    return transformers


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class MemoryLayout:
    """Where the memory layers of a (plain, merged) model sit and which pool each one reads."""

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


def memory_layout(model: Transformer) -> MemoryLayout | None:
    from memlayers import ProductKeyMemory

    pools = list(getattr(model, "memory_pools", []))
    layers, pool_ids = [], []
    for i, block in enumerate(model.layers):
        ffn = block.feed_forward
        if isinstance(ffn, ProductKeyMemory):
            match = [j for j, p in enumerate(pools) if p is ffn.pool]
            if not match:
                raise UserError(f"layer {i}'s memory reads a value pool the model does not own (model.memory_pools)")
            layers.append(i)
            pool_ids.append(match[0])
    return MemoryLayout(layers, pool_ids, len(pools)) if layers else None


def _state_for_export(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor once, under our names (the tied output projection dropped: HF re-ties it)."""
    state = dict(model.state_dict())
    if model.output.weight is model.tok_embeddings.weight:
        state.pop("output.weight")
    return state


def hf_config(model: Transformer, cfg: Config, layout: MemoryLayout | None, dtype: torch.dtype, bos: int, eos: int):
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
    kwargs["dtype" if _major(transformers.__version__) >= 5 else "torch_dtype"] = str(dtype).removeprefix("torch.")
    if layout is None:
        return transformers.LlamaConfig(**kwargs)
    from launch.convert.memory_configuration import MemoryLlamaConfig

    mem = cfg.memory
    memory = dict(
        memory_layers=layout.layers,
        memory_pool_ids=layout.pool_ids,
        memory_n_pools=layout.n_pools,
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


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "2GB", "1GiB" (the units `save_pretrained(max_shard_size=)` takes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size={size!r}: expected bytes or a size like 500MB, 2GB, 1GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    """HF's safetensors layout: one model.safetensors, or numbered shards plus an index when the
    tensors exceed `max_shard_size` (a tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        files.append(fname)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


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
    layout = memory_layout(model)
    from launch.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    state = _state_for_export(model)
    state = {k: v.detach().to("cpu", torch_dtype) for k, v in state.items()}
    hf_state = names.to_hf_state_dict(state, model.cfg.n_heads, model.cfg.kv_heads)
    config = hf_config(model, cfg, layout, torch_dtype, tok.bos_id, tok.eos_id)

    with output_dir(out, command=EXPORT_COMMAND, overwrite=overwrite, sources=sources) as tmp:
        write_portable_config(config, tmp, model.cfg.rope_theta, torch_dtype)
        if layout is not None:
            for fname in REMOTE_CODE:
                shutil.copyfile(HERE / fname, tmp / fname)
        write_weights(hf_state, tmp, max_shard_size)
        gen = transformers.GenerationConfig(
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id if tok.pad_id >= 0 else None
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


# ---------------------------------------------------------------------------------------------
# Import


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"cannot parse {path}: {e}") from None


def _rope_theta(hf: dict, source: str) -> float:
    """rope_theta from a transformers 5 `rope_parameters` or a 4.x `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    # Both fields are checked: a scaling left in `rope_scaling` next to a default `rope_parameters`
    # would otherwise be silently dropped.
    for field in ("rope_parameters", "rope_scaling"):
        scaling = hf.get(field)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise UserError(f"{source}: {field}={scaling!r} is not supported (expected a mapping)")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise UserError(
                f"{source}: {field}.rope_type={kind!r} is not supported: launch.model implements plain RoPE "
                "(rope_type 'default') only"
            )
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Our ModelConfig for an HF Llama config dict; fails naming the first field we cannot honour."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "memory_llama"):
        raise UserError(f"{source}: model_type={model_type!r} is not supported (expected 'llama')")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
    }
    for field, (value, want) in unsupported.items():
        if value != want:
            raise UserError(f"{source}: {field}={value!r} is not supported (launch.model needs {field}={want!r})")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in hf:
            raise UserError(f"{source}: config.json lacks {field}")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != dim:
        raise UserError(
            f"{source}: head_dim={head_dim} is not supported: launch.model needs head_dim = hidden_size / "
            f"num_attention_heads = {dim // heads}"
        )
    cfg = ModelConfig(
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        ffn_dim=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf, source),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def memory_config_from_hf(hf: dict, source: str) -> MemoryConfig:
    """Our MemoryConfig for an exported memory-Llama config (the layouts our builder can make)."""
    from launch.convert.memory_configuration import MEMORY_DEFAULTS

    get = lambda key: hf.get(key, MEMORY_DEFAULTS[key])  # noqa: E731
    layers, pool_ids, n_pools = list(get("memory_layers")), list(get("memory_pool_ids")), get("memory_n_pools")
    shared = n_pools == 1 and all(p == 0 for p in pool_ids)
    if not shared and pool_ids != list(range(len(layers))):
        raise UserError(
            f"{source}: memory_pool_ids={pool_ids} is not supported: launch.build makes one shared pool or one pool "
            "per memory layer"
        )
    if not get("memory_bias"):
        raise UserError(f"{source}: memory_bias=false is not supported (memlayers uses biases)")
    return MemoryConfig(
        layers=layers,
        n_keys=int(get("memory_n_keys")),
        heads=int(get("memory_heads")),
        k_dim=int(get("memory_k_dim")),
        knn=int(get("memory_knn")),
        v_dim=get("memory_v_dim"),
        gated=bool(get("memory_gated")),
        qk_norm=bool(get("memory_qk_norm")),
        query_batchnorm=bool(get("memory_query_batchnorm")),
        shared=shared,
    )


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory: safetensors (single or sharded), else pytorch_model.bin loaded
    with weights_only=True (no code is unpickled)."""
    if (hf_dir / WEIGHTS_INDEX).is_file():
        files = _index_files(hf_dir / WEIGHTS_INDEX)
    elif (hf_dir / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        bins = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise UserError(f"{hf_dir} holds no model weights (model.safetensors[.index.json] or pytorch_model*.bin)")
        state: dict[str, torch.Tensor] = {}
        for b in bins:
            try:
                state.update(torch.load(b, map_location="cpu", weights_only=True))
            except Exception as e:  # truncated zip, or a pickle that is more than plain tensors
                raise UserError(f"cannot read {b}: not a complete plain tensor file ({str(e).splitlines()[0][:200]})") from None
        return state
    state = {}
    for fname in files:
        state.update(read_safetensors(hf_dir / fname))
    return state


def _index_files(index: Path) -> list[str]:
    """The shard files a sharded safetensors index names; a damaged index fails in one line naming it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # torn JSON, not UTF-8, no/odd weight_map
        raise UserError(
            f"cannot read {index}: expected a JSON object with a \"weight_map\" of tensor name -> shard file "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise UserError(f"cannot read {index}: weight_map names {name!r}, expected a file name in {index.parent}")
    return files


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or damaged file fails in one line naming it."""
    if not path.is_file():
        raise UserError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # SafetensorError (header/size mismatch), OSError: the file is damaged
        raise UserError(f"cannot read {path}: damaged or truncated safetensors file ({str(e).splitlines()[0][:200]})") from None


def _hf_state_to_ours(hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    # Buffers older exports carry (rotary inv_freq) hold nothing our model needs.
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model_cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # HF ignores it when tied; so do we
    elif "lm_head.weight" not in hf_state:
        raise UserError(f"{source}: tie_word_embeddings is false but the weights have no lm_head.weight")
    try:
        state = names.from_hf_state_dict(hf_state, model_cfg.n_heads, model_cfg.kv_heads)
    except KeyError as e:
        raise UserError(f"{source}: {e.args[0]}") from None
    if model_cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def import_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """`python -m launch.convert from-hf hf=HFDIR out=CKPT`: an HF Llama dir -> a checkpoint dir (step 0).

    Weights become fp32 (the trainer's master precision). The tokenizer must be a sentencepiece
    model: HFDIR/tokenizer.model, or `tokenizer=PATH`."""
    from launch.models.build import build_model

    hf_dir, out = Path(hf_dir), Path(out)
    check_output_dir(out, command=IMPORT_COMMAND, overwrite=overwrite, sources=(hf_dir,))  # before any loading
    source = str(hf_dir / "config.json")
    hf = read_hf_config(hf_dir)
    cfg = Config()
    cfg.model = model_config_from_hf(hf, source)
    if hf.get("model_type") == "memory_llama":
        cfg.memory = memory_config_from_hf(hf, source)
    # config.yaml must validate as a training config on its own (`config=CKPT/config.yaml`).
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
    tok_path = Path(tokenizer) if tokenizer else hf_dir / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(
            f"no sentencepiece tokenizer at {tok_path}: launch.* tokenizes with sentencepiece, and importing a "
            "tokenizer.json-only tokenizer is not supported; pass tokenizer=PATH/to/tokenizer.model"
        )
    from launch.data.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    if tok.vocab_size != cfg.model.vocab_size:
        # Training checks this; fail now rather than after a long conversion.
        raise UserError(
            f"tokenizer {tok_path} has {tok.vocab_size} pieces but {source} has vocab_size={cfg.model.vocab_size}"
        )
    state = _hf_state_to_ours(read_hf_weights(hf_dir), cfg.model, source)

    model = build_model(cfg)
    check_model_state(model, state, str(hf_dir))
    with torch.no_grad():
        model.load_state_dict(state)  # copies (and casts to fp32) into the built model
    write_checkpoint_dir(model, cfg, tok_path, out, overwrite, source=str(hf_dir), sources=(hf_dir,))
    return out


def write_checkpoint_dir(
    model: nn.Module, cfg: Config, tok_path: Path, out: Path, overwrite: bool, source: str, sources: tuple = ()
) -> None:
    """A step-0 checkpoint dir in launch.checkpoint's format (temp dir, manifest, rename; launch.runtime.outputs' rules)."""
    from launch.checkpoint.checkpointer import write_model_checkpoint

    # No data position: a run started from here begins its stream at the start.
    trainer_state = {"step": 0, "tokens": 0, "data": {"consumed": 0}, "world_size": 1, "source": source}
    write_model_checkpoint(
        out, model, trainer_state, to_yaml(cfg), tok_path, command=IMPORT_COMMAND, overwrite=overwrite, sources=sources
    )

