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
    import signal as _signal
    import tempfile as _tempfile

    # Before anything is imported: under `ulimit -f` a write past the limit is then an EFBIG error that
    # the command reports in one line (launch.runtime.errors.run_cli), not a kill by SIGXFSZ; and
    # importing torch needs a writable temporary directory, which is said in one line when there is none.
    if hasattr(_signal, "SIGXFSZ"):
        _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    # Ctrl-C (or torchrun passing it on) while the command imports torch ends it quietly with the
    # shell's status; `run_cli` gives SIGINT back to Python once the command runs (one line then).
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _signal.Handlers.SIG_DFL)
    try:
        _tempfile.gettempdir()
    except FileNotFoundError as _e:
        from launch.runtime.errors import no_temp_dir_message

        print(f"error: {no_temp_dir_message(_e)}", file=_sys.stderr)
        raise SystemExit(2) from None
