"""The trainer and its tools. Commands at the top, run as `python -m launch.NAME` (several processes:
`python -m launch.torchrun ... -m launch.train`): train, eval, grow, convert, sweep, tokenize, tokenizer,
facts, plan, report, quickstart, torchrun. Everything else is grouped by job:

    train/        the fit loop, parameter groups and optimizers, loss, validation, metrics, watchdog
    data/         sources (files, `datasets`, hf://), tokenizer, tokenizing into shards, the batch stream
    checkpoint/   the checkpoint format: DCP checkpointer, reader, manifest, atomic commit, legacy reader
    distributed/  process groups, the parallel layout (TP, memory parallel, FSDP2/DDP), init, plan
    models/       the Llama decoder, building it from a config (memory layers, growth), generation
    config/       typed schemas, loading YAML + overrides, validation, generated --help
    runtime/      one-line errors, the run-directory lock, safe outputs, signals, crash debris, faults
    eval/ convert/ sweep/   the evaluation suite, Hugging Face conversion, ablation sweeps
"""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m launch.NAME` while Python locates the command: not an import
    import tempfile as _tempfile

    from launch.runtime.errors import (
        ignore_file_size_signal,
        no_temp_dir_message,
        quiet_interrupt_during_start_up,
    )

    # Before anything is imported: under `ulimit -f` a write past the limit is an EFBIG error that the
    # command reports in one line, not a kill by SIGXFSZ; Ctrl-C during the imports ends quietly; and
    # importing torch needs a writable temporary directory, which is said in one line when there is none.
    ignore_file_size_signal()
    quiet_interrupt_during_start_up()
    try:
        _tempfile.gettempdir()
    except FileNotFoundError as _e:
        print(f"error: {no_temp_dir_message(_e)}", file=_sys.stderr)
        raise SystemExit(2) from None
