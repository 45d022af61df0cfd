"""Import a Hugging Face Llama (or an exported memory-Llama) directory as a checkpoint directory that
`launch.train train.init_from=`, `launch.grow` and `launch.eval` accept (`python -m launch.convert
from-hf`). Config fields our model cannot reproduce fail with the field's name instead of converting
into a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from launch.checkpoint.read import check_model_state
from launch.config import Config, MemoryConfig, to_yaml
from launch.convert import names
from launch.convert.weights import read_hf_weights
from launch.models.llama import ModelConfig
from launch.runtime.errors import UserError
from launch.runtime.outputs import check_output_dir

IMPORT_COMMAND = "launch.convert from-hf"  # recorded in launch.runtime.outputs.MARKER


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
            raise UserError(
                f"{source}: {field}={value!r} is not supported (launch.model needs {field}={want!r})"
            )
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
    layers, pool_ids, n_pools = (
        list(get("memory_layers")),
        list(get("memory_pool_ids")),
        get("memory_n_pools"),
    )
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


def _hf_state_to_ours(
    hf_state: dict[str, torch.Tensor], model_cfg: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
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
    check_output_dir(
        out, command=IMPORT_COMMAND, overwrite=overwrite, sources=(hf_dir,)
    )  # before any loading
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
    model: nn.Module,
    cfg: Config,
    tok_path: Path,
    out: Path,
    overwrite: bool,
    source: str,
    sources: tuple = (),
) -> None:
    """A step-0 checkpoint dir in launch.checkpointer's format (temp dir, manifest, rename; launch.outputs' rules)."""
    from launch.checkpoint.checkpointer import write_model_checkpoint

    # No data position: a run started from here begins its stream at the start.
    trainer_state = {"step": 0, "tokens": 0, "data": {"consumed": 0}, "world_size": 1, "source": source}
    write_model_checkpoint(
        out,
        model,
        trainer_state,
        to_yaml(cfg),
        tok_path,
        command=IMPORT_COMMAND,
        overwrite=overwrite,
        sources=sources,
    )
