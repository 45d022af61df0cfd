"""Batched log-likelihoods of continuations given contexts, and rolling windows for perplexity.

Works with any callable `model(tokens (B, T) long) -> logits (B, T, V)` (our `Transformer`, a
grown or memory model, or a test stub).

Tokenisation (the lm-eval convention): trailing whitespace of the context moves to the front of
the continuation, then context + continuation is encoded *whole* and split at the token length
of the context encoded alone. The scored tokens are therefore exactly the tokens the model would
see for the joined text, and a merge across the boundary never scores a context character. Every
context starts with BOS (the repo's one start-of-sequence convention, Llama's: training documents
are BOS + text + EOS, prompts are BOS + text; see `Tokenizer.encode_prompt`). lm-eval's own `hf`
model on our Hugging Face export tokenizes the same way (its tokenizer adds BOS), so both give the
same log-likelihoods.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from launch.data.tokenizer import Tokenizer
from launch.runtime.faults import fault_point

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


_UNLIMITED = 1 << 62


def context_limit(model: Callable, max_len: int | None = None) -> int:
    """`max_len`, else the model's `cfg.max_seq_len`; a bare callable without one is taken to
    accept any length."""
    if max_len is not None:
        return max_len
    cfg = getattr(model, "cfg", None)
    return int(cfg.max_seq_len) if hasattr(cfg, "max_seq_len") else _UNLIMITED


def model_device(model: Callable) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


def prefix_token(tokenizer: Tokenizer) -> int:
    """The token every scored context starts with: BOS (`Tokenizer.encode_prompt`)."""
    return tokenizer.bos_id


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """Token ids of (BOS + context, continuation); see the module docstring."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not continuation:
        raise ValueError("cannot score an empty continuation")
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context)) if context else 0
    n_ctx = min(n_ctx, len(whole) - 1)  # a merge across the boundary must still leave a token to score
    return [prefix_token(tokenizer), *whole[:n_ctx]], whole[n_ctx:]


@torch.no_grad()
def loglikelihoods(
    model: Callable,
    requests: Sequence[Request],
    batch_size: int = 16,
    max_len: int | None = None,
    device: torch.device | None = None,
    desc: str | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), whether greedy decoding reproduces it) per request.

    Contexts longer than the model's window are truncated from the left (a continuation longer
    than the window keeps only its last max_len tokens scored, with a warning). Requests are sorted by
    length (longest first) so each padded batch wastes little; padding goes on the right where a
    causal model cannot see it."""
    max_len = context_limit(model, max_len)
    device = device or model_device(model)
    inputs: list[list[int]] = []
    scored: list[list[int]] = []  # the continuation tokens actually scored
    n_cut = 0
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        if not ctx:
            raise ValueError(f"request {i}: empty context (start it with BOS)")
        inputs.append((ctx + cont)[-(max_len + 1) : -1])
        # A continuation longer than the window cannot be scored whole: score its last max_len
        # tokens (conditioned on the rest of it) rather than fail a whole task on one long option.
        scored.append(cont[-max_len:])
        n_cut += len(cont) > max_len
    if n_cut:
        warnings.warn(
            f"{n_cut} of {len(requests)} continuations are longer than the context limit {max_len}; "
            "only their last tokens were scored",
            stacklevel=2,
        )
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for n, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        fault_point(n)  # LAUNCH_FAULT's kill/sigterm/stall at a batch: the failure tests' hook
        width = len(inputs[batch[0]])
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: not scored
        for row, i in enumerate(batch):
            end, cont = len(inputs[i]), scored[i]
            tokens[row, :end] = torch.tensor(inputs[i])
            targets[row, end - len(cont) : end] = torch.tensor(cont)
        logits = model(tokens.to(device))
        targets = targets.to(logits.device)
        nll = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
        )
        lls = (-nll.view(targets.shape).sum(1)).tolist()
        greedy = ((logits.argmax(-1) == targets) | (targets == -100)).all(1).tolist()
        for row, i in enumerate(batch):
            results[i] = (lls[row], greedy[row])
    return results


def rolling_windows(tokens: Sequence[int], max_len: int, stride: int | None = None) -> list[Request]:
    """Requests that score tokens[1:] each exactly once (tokens[0] is BOS).

    stride=None (= max_len): non-overlapping windows of max_len predicted tokens, each seeing the
    tokens since its window began; the last window is extended leftwards to a full context. A
    smaller stride slides the window: every scored token then sees at least max_len - stride
    tokens of context (when the document has them), at max_len/stride times the compute."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride} must be between 1 and the context limit {max_len}")
    tokens = list(tokens)
    out = []
    for start in range(1, len(tokens), stride):
        end = min(start + stride, len(tokens))
        first = max(0, end - 1 - max_len)
        out.append((tokens[first:start], tokens[start:end]))
    return out
