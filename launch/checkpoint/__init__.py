"""Checkpoints, one package, one module per job: the Checkpointer that saves, finds, loads and prunes a
run's sharded DCP checkpoints and decides when to save (`checkpointer`); the flat state it saves
(`state`); reading and checking a checkpoint (`read`); the single-file format of earlier versions
(`legacy`); atomic directories and the commit marker (`atomic`); where a run's checkpoints are (`paths`);
local paths and fsspec URLs behind one path type (`storage`); per-file checksums
(`manifest`); DCP metadata without unpickling code (`safe_metadata`); one-process collectives
(`collectives`); and loading a checkpoint alone for eval, generation, growth or export (`load`)."""
