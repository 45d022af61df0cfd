"""Checkpoints, one package: the run directory's checkpoint paths and legacy reader (`format`), the sharded
DCP checkpointer (`checkpointer`), per-file checksums (`manifest`), reading DCP metadata without unpickling
code (`safe_metadata`), and loading a checkpoint alone for eval, generation, growth or export (`load`)."""
