"""Hugging Face conversion: our checkpoints <-> `transformers` Llama directories (extra `[hf]`).

    from launch.hf import export_checkpoint, import_hf
    export_checkpoint("runs/tiny", "hf/tiny")          # python -m launch.convert to-hf ...
    import_hf("hf/tiny", "ckpts/tiny_from_hf")         # python -m launch.convert from-hf ...
"""

from launch.hf.llama import export_checkpoint, export_model, import_hf

__all__ = ["export_checkpoint", "export_model", "import_hf"]
