"""The config schemas: typed dataclasses filled by OmegaConf from `config=path.yaml` plus `a.b=c` overrides.

Precedence: dataclass defaults <- YAML (and the files it names under `_base_`) <- command line.
Unknown keys and wrong types fail with one line naming the key, where it came from, and what
was expected. The resolved config is saved with every run and checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launch.models.llama import ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config, metrics.jsonl, checkpoints/ (re-running resumes it)
    seed: int = 0  # seed of initialisation, data order and sampling
    name: str | None = None  # label for logs and W&B (None: the run directory's name)


@dataclass
class MemoryConfig:
    layers: list[int] = field(default_factory=list)  # block indices whose FFN becomes a memory layer
    n_keys: int = 128  # sub-keys per half: n_keys**2 value slots
    heads: int = 4  # query heads per memory layer
    k_dim: int = 128  # key dim (two halves of k_dim/2)
    knn: int = 32  # slots read per head (top-K)
    v_dim: int | None = None  # None: model.dim
    gated: bool = True  # Memory+ silu input gate
    qk_norm: bool = False  # RMS-normalise queries and keys before scoring
    query_batchnorm: bool = False  # batch-normalise query features over the batch's tokens (Lample et al. 2019; synced across data-parallel ranks, running estimates in eval)
    shared: bool = True  # one value pool for every memory layer (False: one per layer)
    value_lr: float = 1e-3  # learning rate of the value table (its own optimizer group)
    value_weight_decay: float = 0.0  # weight decay of the value table
    # row_sparse_adam (the paper's dense-AdamW recipe to float tolerance, touching read rows only) | adamw
    # (torch's AdamW over every row every step: the same result, several times slower on large tables) |
    # rowwise_adam (one second moment per row)
    value_optimizer: str = "row_sparse_adam"
    lookup_impl: str = "auto"  # auto | torch | triton | cpu
    value_dtype: str = "fp32"  # fp32 | bf16: storage of the value table (reads accumulate in fp32; row_sparse_adam/rowwise_adam keep moments in this dtype)
    value_rounding: str = "nearest"  # nearest | stochastic: how row_sparse_adam/rowwise_adam round bf16 stores of values and moments (stochastic keeps updates below half a bf16 step in expectation)
    # row_sparse_adam/rowwise_adam on one process: the lookup backward hands the value gradient to the
    # optimizer, never writing it to .grad; the step runs inside the backward where that is exact (values
    # not clipped, grad_accum=1, one layer per pool), else at the optimizer step (clipping kept exact)
    fused_value_update: bool = True
    # count the value tables in optim.grad_clip's global norm (false: values are neither counted nor
    # scaled, as FBGEMM TBE does; lets the fused update run inside the backward with clipping on)
    clip_values: bool = True


@dataclass
class GrowConfig:
    """How this model was grown (scalenet). Empty `strategy`: not grown."""

    strategy: str | None = None  # scalenet | stack_copy | interleave_copy | llama_pro | solar_dus
    base_layers: int | None = None  # depth before growing (model.n_layers is the grown depth)
    depth: int | None = None  # grown depth (None: 2 x base)
    mapping: Any = "stack"  # stack | interleave | explicit list of source indices
    adapter_rank: int = 8  # rank of each position's low-rank adapter (0: pure sharing)
    targets: list[str] | None = None  # name globs of the Linears that get adapters (None: all)
    untie_norms: bool = False  # scalenet: per-position norm weights instead of shared ones
    adapter_alpha: float | None = None  # scalenet: adapter scale alpha / rank (None: scale 1)
    every: int | None = None  # llama_pro: insert a copy after every k-th block (None: L / (depth - L))
    zero_init: list[str] | None = None  # llama_pro: zeroed output projections of inserted copies
    freeze_original: bool = False  # llama_pro: only the inserted copies train (kept in `spec`)
    m: int | None = None  # solar_dus: blocks dropped at the seam (depth = 2L - 2m)
    spec: Any = None  # the exact structure recorded by scalenet (rebuilds the tie pattern on load)


@dataclass
class DataConfig:
    # "shakespeare" (bundled), a local file / directory / glob, a save_to_disk directory [DIR:SPLIT],
    # or a hub dataset hf://NAME[/CONFIG][:SPLIT][@REVISION] (streamed)
    train: str = "shakespeare"
    # the same kinds (default split of a dataset: validation); None: no validation
    val: str | None = "shakespeare"
    format: str = "auto"  # auto | text | jsonl | parquet | csv | arrow
    text_field: str = "text"  # JSONL/Parquet/CSV/dataset column holding the text
    # what separates documents in a .txt file: file (whole file, streamed in chunks) | blank_line | line |
    # any other string, e.g. '<|endoftext|>' (backslash escapes like \n allowed)
    doc_separator: str = "file"
    # lines a tokenizer trained with the run uses at most (random sample); 0: all
    tokenizer_sample: int = 2_000_000
    tokenizer: str | None = None  # path to a sentencepiece .model; None: train one with the run
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 32  # GLOBAL batch in sequences per optimizer step
    val_sequences: int = 128  # validation sequences evaluated each time
    # Extra training sources mixed in: [{path: facts/train.txt, ratio: 0.2}, ...] (optional per
    # entry: format, text_field). `ratio` is the fraction of training SEQUENCES drawn from that
    # source (small sources repeat); data.train gets 1 - sum(ratios). Validation uses data.val only.
    mix: list[Any] = field(default_factory=list)
    # where sources that are not shard directories are tokenized to; None: RUN_DIR/data_cache
    cache_dir: str | None = None
    tokenize_workers: int = 0  # processes that tokenize a source not yet in the cache; 0: one per CPU core
    # strict: refuse non-UTF-8 text (file and byte offset) | replace: decode with U+FFFD
    encoding_errors: str = "strict"


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | constant | linear
    weight_decay: float = 0.1  # matrices only; norms, biases and embeddings are not decayed
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainConfig:
    steps: int = 1000  # total optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10  # steps between metrics records (and plain progress lines)
    ckpt_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # checkpoints kept on disk
    # where checkpoints go: a local path or an fsspec URL (s3://, gs:// with the [s3]/[gcs] extras, file://);
    # None: RUN/checkpoints. run.dir stays local (lock, metrics.jsonl, logs). One run per directory
    checkpoint_dir: str | None = None
    val_every: int = 200  # steps between validation losses (0: never)
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    # tqdm bar on a terminal; false (or stdout not a terminal): a plain line every log_every steps
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard (extra [tensorboard])
    init_from: str | None = None  # checkpoint to start from (weights only; fresh optimizer)
    reset_data: bool = False  # with init_from: restart the data stream instead of continuing it
    # write checkpoints in a background thread (DCP async_save); training continues
    async_checkpoint: bool = False
    # none | full | selective (every other block): recompute activations in backward
    activation_checkpoint: str = "none"
    # sequences in the end-of-training validation: -1 the whole split, 0 none, N the first N
    final_val_sequences: int = -1
    wandb: str | None = None  # W&B project to log to as well (extra [wandb]; WANDB_MODE=offline: no network)
    # seconds without step progress on a rank before every rank writes its stacks to RUN/stacks/ and the
    # job exits 4 instead of hanging (0: off); also the collective timeout, max(watchdog_s, 60) s
    watchdog_s: float = 1800
    # signals that checkpoint at the next step boundary: SIGTERM/SIGINT then exit 0, others (SLURM's
    # --signal=USR1@120 warning) exit 75, 'requeue me'
    checkpoint_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # after a requeue signal's checkpoint, rank 0 runs `scontrol requeue $SLURM_JOB_ID` (under SLURM)
    requeue: bool = False


@dataclass
class ParallelConfig:
    data: str = "ddp"  # ddp | fsdp
    memory: int = 1  # memory-parallel group size (values sharded by embedding dim)
    tensor: int = 1  # tensor-parallel size (attention heads and FFN units split)
    backend: str = "auto"  # auto | gloo | nccl


@dataclass
class EvalConfig:
    every: int = 0  # run `tasks` every N training steps (0: never)
    # FORMAT:PATH[?shots=PATH][&name=NAME] or a built-in name (shakespeare)
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # rows per task (windows for text); None: all
    shots: int = 0  # few-shot examples before each prompt
    batch_size: int = 16  # sequences per forward
    max_new_tokens: int = 32  # generative tasks: answer length limit
    sample_prompt: str = "ROMEO.\n"  # prompt of the printed sample generation
    sample_tokens: int = 64  # tokens in the printed sample (0: no sample)
    # 0: greedy sample (loops on a small model); > 0: sampled with eval.seed
    sample_temperature: float = 0.8
    sample_top_k: int | None = 50  # sampled sample: keep the top-k tokens (None: all)
    # sampled sample: keep the most likely tokens holding this much probability (1: all)
    sample_top_p: float = 0.95
    seed: int = 0  # seed of the sampled sample
    text_stride: int = 0  # perplexity windows: 0 = non-overlapping; S < max_seq_len slides by S tokens


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # where the run lives
    model: ModelConfig = field(default_factory=ModelConfig)  # the Llama-style decoder
    # product-key memory layers (empty layers: dense)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    grow: GrowConfig = field(default_factory=GrowConfig)  # ScaleNet growth (set by launch.grow)
    data: DataConfig = field(default_factory=DataConfig)  # training and validation text
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the LR schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop, logging, checkpoints
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # distributed layout
    # evaluation tasks (launch.eval, and during training)
    eval: EvalConfig = field(default_factory=EvalConfig)
