"""Distributed: process groups (`process_group`), the mesh and the parallel layout applied in one fixed
order (`parallelize`), layout-independent initialisation (`param_init`), the memory plan of a layout
(`plan`) and the global gradient norm (`grad_norm`)."""
