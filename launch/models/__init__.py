"""Models: the Llama-style decoder (`llama`, architecture only), composing it from a config with memory
layers and ScaleNet growth (`build`), and KV-cached generation (`generate`). A new model goes here."""
