"""lm-evaluation-harness adapter (the `[eval]` extra): any harness task against our checkpoints.

    import launch.eval.harness  # registers model "memscale"
    lm_eval.simple_evaluate(model="memscale", model_args="checkpoint=runs/x", tasks=[...])

or from the shell (this module registers the model, then runs lm-eval's own CLI):

    python -m launch.evaluation.harness run --model memscale --model_args checkpoint=runs/x \
        --tasks hellaswag --include_path my_tasks/

The three request types go through the same code as `launch.eval` (`launch.evaluation.scoring`,
`launch.generate`), so both give the same numbers for the same prompts.
"""

from __future__ import annotations

import warnings
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's built-in models first: see below)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from launch.data.tokenizer import Tokenizer
from launch.eval.scoring import encode_pair, loglikelihoods, rolling_windows
from launch.models.generate import generate

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _batch_size(value: Any, default: int = 16) -> int:
    """The harness passes --batch_size through as int or string ('8', 'auto', 'auto:4')."""
    if value is None or str(value).startswith("auto"):
        return default
    return int(value)


@register_model("memscale")
class MemscaleLM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int = 256,
        dtype: str = "fp32",
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        **_: Any,  # the harness may pass options we do not use (e.g. max_batch_size)
    ):
        super().__init__()
        if model is None:
            if not checkpoint:
                raise ValueError(
                    "memscale needs model_args='checkpoint=PATH' (a run dir or checkpoints/step_N)"
                )
            from launch.checkpoint.load import load_checkpoint

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda by default; fall back like its HF model does.
                warnings.warn(f"device={device} requested but CUDA is not available: using cpu", stacklevel=2)
                device = "cpu"
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
            loaded = load_checkpoint(checkpoint, device, DTYPES[dtype])
            model, tokenizer = loaded.model, loaded.tokenizer
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Tokenizer, **kwargs: Any) -> MemscaleLM:
        """Wrap an in-memory model (e.g. inside a training run) instead of loading a checkpoint."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """As lm-eval's `hf` model (HFLM._loglikelihood_tokens): a context that does not fit with its
        continuation is cut from the left, with a warning; a continuation longer than the context
        window is refused, since it cannot be scored whole (`launch.eval` itself scores its last
        tokens instead, but a harness number must mean what `hf`'s would)."""
        pairs = [encode_pair(self.tokenizer, ctx, cont) for ctx, cont in (r.args for r in requests)]
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) > self.max_length:
                raise ValueError(
                    f"loglikelihood request {i}: the continuation is {len(cont)} tokens, longer than the "
                    f"model's context window ({self.max_length}); lm-eval's hf model refuses it too"
                )
            if len(ctx) + len(cont) > self.max_length + 1:
                warnings.warn(
                    f"loglikelihood request {i}: context ({len(ctx)} tokens) and continuation ({len(cont)}) "
                    f"exceed the context window ({self.max_length}); the first "
                    f"{len(ctx) + len(cont) - self.max_length - 1} context tokens are dropped, as hf does",
                    stacklevel=2,
                )
        results = loglikelihoods(
            self.model,
            pairs,
            self.batch_size,
            device=self._device,
            desc="loglikelihood",
            progress=not disable_tqdm,
        )
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string after BOS, in the harness's
        windows (each token predicted once; the last window gets a full context)."""
        flat, owner = [], []
        for i, req in enumerate(requests):
            ids = self.tokenizer.encode_prompt(req.args[0])
            windows = rolling_windows(ids, self.max_length)
            flat += windows
            owner += [i] * len(windows)
        scores = loglikelihoods(
            self.model, flat, self.batch_size, device=self._device, desc="rolling", progress=not disable_tqdm
        )
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled when do_sample) continuations cut before the first `until` string;
        requests sharing generation settings are batched together."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampled = bool(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0 if sampled else 0.0)) if sampled else 0.0
            key = (
                tuple(until),
                int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                temperature,
                kwargs.get("top_k"),
                kwargs.get("seed"),
            )
            groups.setdefault(key, []).append(i)
        out = [""] * len(requests)
        for key, idx in groups.items():
            until, max_new, temperature, top_k, seed = key
            texts = generate(
                self.model,
                self.tokenizer,
                [requests[i].args[0] for i in idx],
                max_new,
                stop=until,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                batch_size=self.batch_size,
            )
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
