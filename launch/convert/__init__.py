"""Hugging Face conversion behind `python -m launch.convert` (extra `[hf]`): our checkpoints <-> `transformers`
Llama directories.

    from launch.convert.llama import export_checkpoint, import_hf
    export_checkpoint("runs/tiny", "hf/tiny")          # python -m launch.convert to-hf ...
    import_hf("hf/tiny", "ckpts/tiny_from_hf")         # python -m launch.convert from-hf ...

`names` is the one state-dict name map, `tokenizer_json` turns the sentencepiece model into a
`tokenizer.json`, `memory_modeling`/`memory_configuration` are the remote code shipped with memory-model
exports. Nothing is imported here, so `python -m launch.convert --help` needs no transformers.
"""
