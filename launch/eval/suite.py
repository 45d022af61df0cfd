"""Run evaluation tasks on a model and write the results.

`TaskEvaluator` (over `run_tasks`) is what `launch.train` runs every `eval.every` steps; `launch.eval` uses
`run_suite` + `write_results`. Under torch.distributed every rank runs the same computation (no
sharding), so models whose forward itself runs collectives (FSDP2, memory-parallel values) stay in
lockstep and nothing can deadlock; only rank 0 prints or writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from launch.config import EvalConfig
from launch.data.tokenizer import Tokenizer
from launch.distributed.process_group import DistInfo
from launch.eval.formats import QA, MultipleChoice
from launch.eval.qa_metrics import best_over_golds
from launch.eval.scoring import encode_pair, loglikelihoods, rolling_windows
from launch.eval.tasks import (
    Document,
    TaskSpec,
    TokenDocument,
    load_examples,
    open_task_shards,
    parse_task_specs,
    split_shots,
    text_documents,
)
from launch.models.generate import generate
from launch.runtime.errors import UserError


@dataclass
class TaskResult:
    metrics: dict[str, float | int]
    predictions: list[dict[str, Any]] = field(default_factory=list)  # generative tasks only


@dataclass
class _Ctx:
    """What every task evaluator needs besides its examples."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    cfg: EvalConfig
    device: torch.device
    sync: bool
    progress: bool
    name: str


def _shot_prefix(shots: list) -> str:
    return "".join(s.as_shot() + "\n\n" for s in shots)


def _choice_chars(continuation: str) -> int:
    """Characters of an option without the space that joins it to the prompt: lm-eval's
    acc_norm divides by the length of the choice text, before the target delimiter is added."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def evaluate_multiple_choice(ctx: _Ctx, examples: list[MultipleChoice], shots: list) -> TaskResult:
    """acc: the option with the highest summed log-likelihood; acc_norm: the highest
    log-likelihood per character of the option (lm-eval's length normalisation)."""
    prefix = _shot_prefix(shots)
    requests, spans = [], []
    for ex in examples:
        ex = ex.with_prefix(prefix) if prefix else ex
        spans.append((len(requests), [_choice_chars(cont) for _, cont in ex.options]))
        requests.extend(encode_pair(ctx.tokenizer, c, x) for c, x in ex.options)
    lls = loglikelihoods(
        ctx.model, requests, ctx.cfg.batch_size, device=ctx.device, desc=ctx.name, progress=ctx.progress
    )
    correct = correct_norm = 0
    for ex, (first, lengths) in zip(examples, spans):
        scores = [ll for ll, _ in lls[first : first + len(lengths)]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex.label)
        normed = [s / max(n, 1) for s, n in zip(scores, lengths)]
        correct_norm += int(max(range(len(normed)), key=normed.__getitem__) == ex.label)
    n = len(examples)
    return TaskResult({"acc": correct / n, "acc_norm": correct_norm / n, "n": n})


def evaluate_generative(ctx: _Ctx, examples: list[QA], shots: list) -> TaskResult:
    """Greedy answers cut at the first newline; exact match and F1 after SQuAD normalisation,
    each the best over the gold answers."""
    prefix = _shot_prefix(shots)
    prompts = [prefix + ex.prompt() for ex in examples]
    outputs: list[str] = []
    bs = ctx.cfg.batch_size
    for start in tqdm(range(0, len(prompts), bs), desc=ctx.name, disable=not ctx.progress, leave=False):
        outputs += generate(
            ctx.model,
            ctx.tokenizer,
            prompts[start : start + bs],
            ctx.cfg.max_new_tokens,
            stop=["\n"],
            batch_size=bs,
            sync=ctx.sync,
        )
    preds, em_sum, f1_sum = [], 0.0, 0.0
    for ex, out in zip(examples, outputs):
        pred = out.strip()
        em, f1 = best_over_golds(pred, ex.answers)
        em_sum, f1_sum = em_sum + em, f1_sum + f1
        preds.append({"question": ex.question, "prediction": pred, "gold": ex.answers, "em": em, "f1": f1})
    n = len(examples)
    return TaskResult({"exact_match": em_sum / n, "f1": f1_sum / n, "n": n}, preds)


def _scored_ids(tokenizer: Tokenizer, doc: Document | TokenDocument) -> tuple[list[int], int | None]:
    """BOS + pieces of a document, and the UTF-8 bytes of its text when known without decoding.
    A shard document's closing EOS is dropped: the text path encodes BOS + pieces
    (`Tokenizer.encode_prompt`) and never scores an EOS, so both give the same perplexity."""
    if isinstance(doc, Document):
        return tokenizer.encode_prompt(doc.text), len(doc.text.encode("utf-8"))
    ids = doc.ids.tolist()
    if ids and ids[-1] == tokenizer.eos_id:
        ids.pop()
    return ids, None


def evaluate_text(
    ctx: _Ctx, docs: Iterable[Document | TokenDocument], limit: int | None, source: str = ""
) -> TaskResult:
    """Perplexity over documents, each encoded BOS + text (`Tokenizer.encode_prompt`) and scored in windows
    of the model's context (see `rolling_windows`; `eval.text_stride` slides them). `limit` caps
    the number of windows. bits_per_byte = total NLL / ln 2 / UTF-8 bytes of the scored text.
    Documents are consumed one at a time and their windows scored in chunks of a few batches, so
    memory does not grow with the corpus (a token shard directory of any size streams through)."""
    max_len = ctx.model.cfg.max_seq_len
    chunk = 8 * max(ctx.cfg.batch_size, 1)
    pending: list = []
    nll, tokens, n_windows, n_bytes, n_docs = 0.0, 0, 0, 0, 0

    def score(requests: list) -> None:
        nonlocal nll, tokens, n_windows
        lls = loglikelihoods(ctx.model, requests, ctx.cfg.batch_size, max_len, ctx.device)
        nll -= sum(ll for ll, _ in lls)
        tokens += sum(len(cont) for _, cont in requests)
        n_windows += len(requests)
        requests.clear()

    for doc in tqdm(docs, desc=ctx.name, unit="doc", disable=not ctx.progress, leave=False):
        if limit is not None and n_windows + len(pending) >= limit:
            break
        ids, doc_bytes = _scored_ids(ctx.tokenizer, doc)
        windows = rolling_windows(ids, max_len, ctx.cfg.text_stride or None)
        if limit is not None and n_windows + len(pending) + len(windows) > limit:
            windows = windows[: limit - n_windows - len(pending)]
            doc_bytes = None
        if doc_bytes is None:  # the text of the scored tokens (the tokenizer round-trips exactly)
            scored = sum(len(cont) for _, cont in windows)
            doc_bytes = len(ctx.tokenizer.decode(ids[1 : 1 + scored]).encode("utf-8"))
        n_bytes += doc_bytes
        pending += windows
        n_docs += 1
        if len(pending) >= chunk:
            score(pending)
    if pending:
        score(pending)
    if tokens == 0:
        # Perplexity over nothing is NaN, which once went out as a result with exit status 0.
        where = f" ({source})" if source else ""
        raise UserError(
            f"task {ctx.name}{where}: no text to score ({n_docs} documents, all empty); give a file with text"
        )
    per_token = nll / tokens
    return TaskResult(
        {
            "nll_per_token": per_token,
            "ppl": math.exp(min(per_token, 700.0)),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
            "tokens": tokens,
            "windows": n_windows,
            "n": n_docs,
        }
    )


def evaluate_task(ctx: _Ctx, task: TaskSpec) -> TaskResult:
    if task.format.kind == "text":
        source = str(task.path) if task.path is not None else "the bundled plays"
        return evaluate_text(ctx, text_documents(task, ctx.tokenizer), ctx.cfg.limit, source)
    examples = load_examples(task)
    shots, examples = split_shots(task, examples, ctx.cfg.shots)
    if ctx.cfg.limit is not None:
        examples = examples[: ctx.cfg.limit]
    if task.format.kind == "multiple_choice":
        return evaluate_multiple_choice(ctx, examples, shots)
    return evaluate_generative(ctx, examples, shots)


def run_suite(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tasks: list[str],
    eval_cfg: EvalConfig,
    info: DistInfo | None = None,
    progress: bool = False,
) -> dict[str, TaskResult]:
    """Every task's metrics and predictions; the model is put in eval mode and restored after."""
    info = info or DistInfo()
    specs = parse_task_specs(tasks)
    for spec in specs:
        if spec.shards:
            open_task_shards(spec, tokenizer)  # a mismatched shard directory fails before any task runs
    was_training = model.training
    model.eval()
    results: dict[str, TaskResult] = {}
    try:
        for spec in tqdm(specs, desc="eval", disable=not (progress and info.is_main)):
            ctx = _Ctx(
                model, tokenizer, eval_cfg, info.device, info.world > 1, progress and info.is_main, spec.name
            )
            results[spec.name] = evaluate_task(ctx, spec)
    finally:
        model.train(was_training)
    return results


def run_tasks(
    model: torch.nn.Module, tokenizer: Tokenizer, tasks: list[str], eval_cfg: EvalConfig, info: DistInfo
) -> dict[str, dict[str, float | int]]:
    """{task name: {metric: value, "n": rows}}: the trainer's entry point (same on every rank)."""
    return {name: r.metrics for name, r in run_suite(model, tokenizer, tasks, eval_cfg, info).items()}


class TaskEvaluator:
    """The trainer's QA evaluation: `due` every eval.every steps when eval.tasks names any; `run`
    scores them (collective: every rank runs the same computation) as flat `eval/TASK/METRIC`
    numbers for the metrics log."""

    def __init__(self, tokenizer: Tokenizer, eval_cfg: EvalConfig, info: DistInfo):
        self.tokenizer, self.cfg, self.info = tokenizer, eval_cfg, info

    def due(self, step: int) -> bool:
        return bool(self.cfg.every and self.cfg.tasks) and step % self.cfg.every == 0

    def run(self, model: torch.nn.Module) -> dict[str, float | int]:
        results = run_tasks(model, self.tokenizer, list(self.cfg.tasks), self.cfg, self.info)
        return {
            f"eval/{task}/{k}": v
            for task, metrics in results.items()
            for k, v in metrics.items()
            if isinstance(v, int | float)
        }


def sample_settings(eval_cfg: EvalConfig) -> str:
    """The decoding settings of the printed sample, as printed beside it: `greedy`, or
    `temperature=0.8 top_k=50 top_p=0.95 seed=0` (then `tokens=N`), so a sample can be reproduced."""
    if eval_cfg.sample_temperature <= 0:
        how = "greedy"
    else:
        how = f"temperature={eval_cfg.sample_temperature:g} top_k={eval_cfg.sample_top_k} "
        how += f"top_p={eval_cfg.sample_top_p:g} seed={eval_cfg.seed}"
    return f"{how} tokens={eval_cfg.sample_tokens}"


def sample(model: torch.nn.Module, tokenizer: Tokenizer, eval_cfg: EvalConfig, sync: bool = False) -> str:
    """`eval.sample_tokens` tokens continuing `eval.sample_prompt`: sampled with
    eval.sample_temperature / sample_top_k / sample_top_p, seeded with eval.seed (greedy when the
    temperature is 0). Sampling is the default because greedy decoding of a small model falls into a
    loop within a few tokens (measured: docs/evaluation.md#the-printed-sample)."""
    was_training = model.training
    model.eval()
    try:
        return generate(
            model,
            tokenizer,
            eval_cfg.sample_prompt,
            eval_cfg.sample_tokens,
            stop=(),
            temperature=eval_cfg.sample_temperature,
            top_k=eval_cfg.sample_top_k,
            top_p=eval_cfg.sample_top_p,
            seed=eval_cfg.seed,
            sync=sync,
        )
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def describe_text_task(spec: TaskSpec, metrics: dict[str, Any], max_len: int, limit: int | None) -> str:
    """Which perplexity this is, in words: the trainer logs another one (`val_ppl`: its first
    data.val_sequences packed sequences), so each output says what it measured."""
    where = spec.dataset or (
        "the whole validation split (bundled plays)" if spec.path is None else str(spec.path)
    )
    scope = (
        f"the first {metrics.get('windows')} windows (eval.limit={limit}) of " if limit is not None else ""
    )
    return (
        f"{spec.name}: ppl {_fmt(metrics.get('ppl'))} over {scope}{where}: {metrics.get('n')} documents, "
        f"{metrics.get('tokens')} tokens in {metrics.get('windows')} windows of up to {max_len} tokens, "
        "each document starting with BOS"
    )


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per (task, metric)."""
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for task, values in metrics.items():
        first = True
        for key, value in values.items():
            if key == "n":
                continue
            lines.append(
                f"| {task if first else ''} | {key} | {_fmt(value)} | {values.get('n', '') if first else ''} |"
            )
            first = False
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: str | Path,
    results: dict[str, TaskResult],
    header: dict[str, Any],
    sample_text: str | None = None,
) -> Path:
    """out/results.json ({**header, "tasks": {...}}), out/results.md, out/predictions/NAME.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {name: r.metrics for name, r in results.items()}
    payload = {**header, "tasks": metrics}
    if sample_text is not None:
        payload["sample"] = sample_text
    (out / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    md = f"# Evaluation of {header.get('checkpoint', '?')}"
    if "step" in header:
        md += f" (step {header['step']})"
    (out / "results.md").write_text(md + "\n\n" + format_table(metrics))
    for name, r in results.items():
        if r.predictions:
            (out / "predictions").mkdir(exist_ok=True)
            with open(out / "predictions" / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in r.predictions:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out / "results.json"
