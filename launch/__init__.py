"""The trainer and its tools. Commands at the top, run as `python -m launch.NAME` (or `torchrun ... -m
launch.train`): train, eval, grow, convert, sweep, tokenize, tokenizer, facts, plan. Everything else is
grouped by job:

    train/        the fit loop, parameter groups and optimizers, loss, validation, metrics, watchdog
    data/         sources (files, `datasets`, hf://), tokenizer, tokenizing into shards, the batch stream
    checkpoint/   the checkpoint format: DCP checkpointer, reader, manifest, atomic commit, legacy reader
    distributed/  process groups, the parallel layout (TP, memory parallel, FSDP2/DDP), init, plan
    models/       the Llama decoder, building it from a config (memory layers, growth), generation
    config/       typed schemas, loading YAML + overrides, validation, generated --help
    runtime/      one-line errors, the run-directory lock, safe outputs, signals, crash debris, faults
    eval/ convert/ sweep/   the evaluation suite, Hugging Face conversion, ablation sweeps
"""
