"""Moved: :mod:`memlayers.query_batchnorm` (named for QueryBatchNorm). This module keeps the old import
path working."""

from memlayers.query_batchnorm import QueryBatchNorm, set_query_norm_group

__all__ = ["QueryBatchNorm", "set_query_norm_group"]
