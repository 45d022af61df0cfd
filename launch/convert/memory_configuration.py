"""Configuration of a Llama whose listed layers use a product-key memory as their MLP.

Remote code: `launch.convert to-hf` copies this file verbatim next to the weights of an exported
memory model. It imports only `transformers`.

Memory fields (all stored in config.json):
    memory_layers    block indices whose MLP is a memory layer
    memory_pool_ids  for each listed layer, the index of the value pool it reads (all 0: one shared pool)
    memory_n_pools   number of value pools (model.memory_pools.{j}.values, each (n_keys**2, v_dim))
    memory_n_keys    sub-keys per half N (N**2 value slots)
    memory_heads     query heads H
    memory_k_dim     key dim k (two halves of k/2)
    memory_knn       slots kept per head K
    memory_v_dim     value width Dv
    memory_gated     Memory+ gate: out(read * silu(gate(x))) instead of out(read)
    memory_qk_norm   RMS-normalise half-queries and sub-keys before scoring
    memory_query_batchnorm  batch-normalise the query features (running estimates in eval)
    memory_bias      biases on query / gate / out
"""

from transformers import LlamaConfig

MEMORY_DEFAULTS = {
    "memory_layers": [],
    "memory_pool_ids": [],
    "memory_n_pools": 1,
    "memory_n_keys": 128,
    "memory_heads": 4,
    "memory_k_dim": 128,
    "memory_knn": 32,
    "memory_v_dim": None,
    "memory_gated": True,
    "memory_qk_norm": False,
    "memory_query_batchnorm": False,
    "memory_bias": True,
}


class MemoryLlamaConfig(LlamaConfig):
    model_type = "memory_llama"

    def memory_setting(self, key: str):
        """A memory field, or its default (None v_dim means hidden_size)."""
        value = getattr(self, key, MEMORY_DEFAULTS[key])
        if key == "memory_v_dim" and value is None:
            return self.hidden_size
        return value
