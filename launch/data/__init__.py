"""Data: where text comes from (`sources`, the bundled `corpus`), the tokenizer (`tokenizer`), tokenizing a
corpus into memory-mapped token shards (`tokenize_corpus`, `shards`), the resumable, rank-sharded batch
stream (`stream`, `permutation`) and the synthetic fact corpus (`facts`)."""
