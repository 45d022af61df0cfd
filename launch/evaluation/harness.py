"""Moved to `launch.eval.harness`; importing this module registers the lm-eval model "memscale" as before."""

from launch.eval.harness import MemscaleLM

__all__ = ["MemscaleLM"]
