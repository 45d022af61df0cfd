"""Hugging Face conversion behind `python -m launch.convert` (extra `[hf]`): our checkpoints <-> `transformers`
Llama directories.

    from launch.convert.export import export_checkpoint
    from launch.convert.import_hf import import_hf
    export_checkpoint("runs/tiny", "hf/tiny")          # python -m launch.convert to-hf ...
    import_hf("hf/tiny", "ckpts/tiny_from_hf")         # python -m launch.convert from-hf ...

`export` and `import_hf` are the two directions, `weights` reads and writes HF's safetensors files,
`names` is the one state-dict name map, `tokenizer_json` turns the sentencepiece model into a
`tokenizer.json`, `memory_modeling`/`memory_configuration` are the remote code shipped with memory-model
exports. Nothing is imported here, so `python -m launch.convert --help` needs no transformers.
"""
