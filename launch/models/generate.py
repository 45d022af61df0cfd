"""KV-cached generation for any `Transformer` (dense, memory or grown: they share the `caches`
interface): greedy, or sampled with temperature, top-k and top-p (nucleus).

Batches need no padding and no attention mask: every row sits at the same absolute position. The
batch is prefilled with the shortest prompt's length; from there, rows whose prompt is longer are
fed their own next prompt token (teacher forcing) while the others are fed what they generated,
as in Meta's reference Llama `generate`. So a row's result does not depend on what it is batched
with. Sampling draws each row from its own generator seeded with `seed`, which keeps that true
for sampling too.

When the window is full (a generation longer than `max_seq_len` allows), the cache is rebuilt from
the last half-window of tokens and generation continues: the context slides in chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from launch.data.tokenizer import Tokenizer

StopFn = Callable[[list[int]], bool]


def _all_ranks_done(done: bool, sync: bool, device: torch.device) -> bool:
    """With `sync` under torch.distributed, stop only when every rank is done, so models whose
    forward runs collectives (FSDP, sharded memory) keep calling forward in lockstep."""
    import torch.distributed as dist

    if not (sync and dist.is_available() and dist.is_initialized()):
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of (B, V) logits: keep the smallest set of most likely tokens whose
    probability adds up to at least `top_p` (always the most likely one), -inf elsewhere. It cuts
    the long tail of unlikely tokens that plain temperature sampling keeps drawing from, which is
    where incoherent words come from, while leaving a flat distribution many choices."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # A token is dropped when the tokens before it already reach top_p; the first never is.
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _pick(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generators: list | None,
    active: list[bool],
    top_p: float = 1.0,
) -> torch.Tensor:
    """Next token per row from last-position logits (B, V). Only `active` rows draw a sample, so a
    row's random stream does not depend on how long its batch-mates' prompts are. Order: temperature,
    then top-k, then top-p over what top-k kept (Hugging Face's order)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1).cpu()
    picks = torch.zeros(len(probs), dtype=torch.long)
    for i, p in enumerate(probs):
        if active[i]:
            picks[i] = torch.multinomial(p, 1, generator=generators[i] if generators else None).item()
    return picks.to(logits.device)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    stop: StopFn | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    sync: bool = False,
) -> list[list[int]]:
    """New token ids per prompt (one batch). A row stops at `eos_id` (not included), when
    `stop(generated_ids)` is true (the triggering tokens are included), or after max_new_tokens.
    Prompts longer than the window keep their last tokens."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS: Tokenizer.encode_prompt)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not hasattr(model, "new_caches"):
        raise TypeError("generation needs a model with new_caches() (launch.model.Transformer)")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    window = model.cfg.max_seq_len
    device = model.tok_embeddings.weight.device
    keep = window - min(max_new_tokens, window // 2)
    prompts = [list(p)[-keep:] for p in prompts]
    lens = [len(p) for p in prompts]
    B, total = len(prompts), max(lens) + max_new_tokens
    buf = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(p)
    in_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    generators = None
    if temperature > 0 and seed is not None:
        generators = [torch.Generator().manual_seed(seed) for _ in range(B)]

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    pos = min(lens)
    caches = model.new_caches(B, window)
    offset = 0  # absolute position of the cache's first slot
    logits = model(buf[:, :pos], caches=caches, start_pos=0)
    for cur in range(pos, total):
        active = [not done[i] and cur >= lens[i] for i in range(B)]
        nxt = _pick(logits[:, -1], temperature, top_k, generators, active, top_p)
        nxt = torch.where(in_prompt[:, cur], buf[:, cur], nxt)
        buf[:, cur] = nxt
        for i in range(B):
            if done[i] or cur < lens[i]:
                continue
            tok = int(nxt[i])
            if eos_id is not None and tok == eos_id:
                done[i] = True
                continue
            out[i].append(tok)
            done[i] = len(out[i]) >= max_new_tokens or (stop is not None and stop(out[i]))
        if cur == total - 1 or _all_ranks_done(all(done), sync, device):
            break
        if cur - offset == window:  # cache full: rebuild it from the last half-window
            offset = cur + 1 - window // 2
            caches = model.new_caches(B, window)
            logits = model(buf[:, offset : cur + 1], caches=caches, start_pos=0)
        else:
            logits = model(buf[:, cur : cur + 1], caches=caches, start_pos=cur - offset)
    return out


def _truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = ("\n",),
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    sync: bool = False,
    top_p: float = 1.0,
) -> str | list[str] | list[list[int]]:
    """Continue `prompts`: text in, text out (cut before the first `stop` string) with a tokenizer;
    with `tokenizer=None`, token-id lists in and out (no stop strings, no EOS).

    Text prompts are encoded BOS + text (`Tokenizer.encode_prompt`); EOS ends a row. Prompts are
    grouped by length into batches of `batch_size`; results come back in the input order."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if tokenizer is None:
        if any(isinstance(p, str) for p in texts):
            raise TypeError("text prompts need a tokenizer; pass token-id lists with tokenizer=None")
        ids = [list(p) for p in texts]
        eos_id, stop_fn = None, None
    else:
        ids = [tokenizer.encode_prompt(t) for t in texts]
        eos_id = tokenizer.eos_id
        stop = tuple(s for s in stop if s)
        stop_fn = (lambda gen: any(s in tokenizer.decode(gen) for s in stop)) if stop else None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new = generate_ids(
            model,
            [ids[i] for i in chunk],
            max_new_tokens,
            eos_id=eos_id,
            stop=stop_fn,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            sync=sync,
        )
        for i, gen in zip(chunk, new):
            results[i] = gen
    if tokenizer is None:
        return results
    out = [_truncate_at_stop(tokenizer.decode(gen), stop) for gen in results]
    return out[0] if single else out
