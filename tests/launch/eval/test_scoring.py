"""Batched log-likelihoods, rolling windows, perplexity and multiple-choice scoring against
naive references."""

import math

import pytest
import torch

from launch.config import EvalConfig
from launch.eval.formats import MultipleChoice
from launch.eval.scoring import encode_pair, loglikelihoods, rolling_windows
from launch.eval.suite import _Ctx, evaluate_multiple_choice, evaluate_text
from launch.eval.tasks import Document

from .conftest import PreferenceModel, random_model


def naive_ll(model, ctx, cont, max_len):
    """One unpadded forward per request; sum of log P(cont_i | everything before it)."""
    full = (ctx + cont)[-(max_len + 1) :]
    logits = model(torch.tensor([full[:-1]]))[0].double().log_softmax(-1)
    n = len(cont)
    positions = range(len(full) - 1 - n, len(full) - 1)
    return sum(logits[p, full[p + 1]].item() for p in positions)


def test_loglikelihoods_match_unbatched_reference():
    model = random_model(vocab=50, max_seq_len=16)
    g = torch.Generator().manual_seed(0)
    requests = []
    for n_ctx, n_cont in [(1, 1), (3, 2), (7, 5), (2, 9), (20, 3), (15, 1)]:  # (20, 3) is truncated
        ids = torch.randint(0, 50, (n_ctx + n_cont,), generator=g).tolist()
        requests.append((ids[:n_ctx], ids[n_ctx:]))
    got = loglikelihoods(model, requests, batch_size=4)
    for (ctx, cont), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(naive_ll(model, ctx, cont, 16), abs=1e-4)


def test_is_greedy_flag():
    model = PreferenceModel(vocab=10, favoured=[7])
    (ll_a, greedy_a), (_, greedy_b) = loglikelihoods(model, [([1], [7, 7]), ([1], [7, 3])], max_len=8)
    assert greedy_a and not greedy_b
    # favoured logit 8 vs 9 others at 0: log p(7) = 8 - log(e^8 + 9)
    assert ll_a == pytest.approx(2 * (8 - math.log(math.exp(8) + 9)), abs=1e-5)


def test_overlong_continuation_scores_its_last_window():
    model = random_model(vocab=50, max_seq_len=8)
    cont = list(range(10, 21))  # 11 tokens, window 8
    with pytest.warns(UserWarning, match="longer than the context limit 8"):
        ((ll, _),) = loglikelihoods(model, [([1, 2], cont)])
    assert ll == pytest.approx(naive_ll(model, [1, 2] + cont[:3], cont[3:], 8), abs=1e-4)


def test_loglikelihoods_errors():
    model = random_model(vocab=50, max_seq_len=8)
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihoods(model, [([1], [])])


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "yes")
    ctx2, cont2 = encode_pair(tokenizer, "Answer:", " yes")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx[0] == tokenizer.bos_id  # every context starts with BOS
    assert ctx[1:] + cont == tokenizer.encode("Answer: yes")
    assert tokenizer.decode(cont).strip() == "yes"
    only, cont3 = encode_pair(tokenizer, "", "Paris")
    assert only == [tokenizer.bos_id] and cont3 == tokenizer.encode("Paris")


@pytest.mark.parametrize(
    "n, max_len, stride", [(20, 4, None), (21, 4, None), (3, 8, None), (30, 6, 2), (9, 4, 1)]
)
def test_rolling_windows_score_each_token_once(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, max_len, stride)
    scored = [t for _, cont in windows for t in cont]
    assert scored == tokens[1:]
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= max_len  # model input fits the window
        start = tokens.index(cont[0])
        assert ctx == tokens[start - len(ctx) : start]  # contiguous, ends right before the scored tokens
        if stride:
            assert len(ctx) + len(cont) - 1 == min(max_len, tokens.index(cont[-1]))  # full context
    ctx, cont = windows[-1]
    assert len(ctx) + len(cont) - 1 == min(max_len, n - 1)  # the last window always has a full context


def _ctx(model, tokenizer, **cfg):
    return _Ctx(model, tokenizer, EvalConfig(batch_size=3, **cfg), torch.device("cpu"), False, False, "t")


def test_perplexity_equals_exp_mean_nll_of_direct_loop(tokenizer):
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=8)
    docs = [Document("To be, or not to be, that is the question."), Document("But soft, what light.")]
    res = evaluate_text(_ctx(model, tokenizer), docs, limit=None).metrics
    nll, count, n_bytes = 0.0, 0, 0
    for doc in docs:  # direct loop: non-overlapping chunks, last chunk extended to a full window
        ids = tokenizer.encode_prompt(doc.text)
        n_bytes += len(doc.text.encode())
        for t in range(1, len(ids)):
            chunk_start = 1 + ((t - 1) // 8) * 8
            last_chunk = chunk_start + 8 >= len(ids)
            first = max(0, len(ids) - 1 - 8) if last_chunk else chunk_start - 1
            logits = model(torch.tensor([ids[first:t]]))[0, -1].double().log_softmax(-1)
            nll -= logits[ids[t]].item()
            count += 1
    assert res["tokens"] == count
    assert res["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert res["n"] == 2


def test_sliding_window_stride_one_gives_every_token_full_context(tokenizer):
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=6)
    doc = Document("Whether 'tis nobler in the mind to suffer.")
    res = evaluate_text(_ctx(model, tokenizer, text_stride=1), [doc], limit=None).metrics
    ids = tokenizer.encode_prompt(doc.text)
    nll = 0.0
    for t in range(1, len(ids)):
        logits = model(torch.tensor([ids[max(0, t - 6) : t]]))[0, -1].double().log_softmax(-1)
        nll -= logits[ids[t]].item()
    assert res["nll_per_token"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_text_limit_caps_windows(tokenizer):
    model = random_model(vocab=tokenizer.vocab_size, max_seq_len=4)
    doc = Document("To be, or not to be, that is the question.")
    res = evaluate_text(_ctx(model, tokenizer), [doc, doc], limit=2).metrics
    assert res["windows"] == 2 and res["tokens"] == 8 and res["n"] == 1
    expected_bytes = len(tokenizer.decode(tokenizer.encode(doc.text)[:8]).encode())
    full = evaluate_text(_ctx(model, tokenizer), [doc], limit=2).metrics
    assert full["bits_per_byte"] == pytest.approx(res["bits_per_byte"])
    assert expected_bytes < len(doc.text.encode())


def test_multiple_choice_picks_the_preferred_continuation(tokenizer):
    context = "Question: is Paris the capital of France?\nAnswer:"
    _, yes = encode_pair(tokenizer, context, " yes")
    _, no = encode_pair(tokenizer, context, " no")
    favoured = sorted(set(yes) - set(no))
    model = PreferenceModel(tokenizer.vocab_size, favoured)
    examples = [
        MultipleChoice([(context, " yes"), (context, " no")], 0),
        MultipleChoice([(context, " no"), (context, " yes")], 1),
        MultipleChoice([(context, " no"), (context, " yes")], 0),  # gold disagrees with the model
    ]
    res = evaluate_multiple_choice(_ctx(model, tokenizer), examples, shots=[]).metrics
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3) and res["n"] == 3


def test_acc_norm_divides_by_continuation_characters(tokenizer):
    # Uniform model: LL = -n_tokens * log V. acc prefers fewer tokens; acc_norm prefers more
    # characters per token. Pick two options where those disagree, worked out from token counts.
    model = PreferenceModel(tokenizer.vocab_size)
    context = "Q:"
    short, long_ = " a b c", " question"
    n_short = len(encode_pair(tokenizer, context, short)[1])
    n_long = len(encode_pair(tokenizer, context, long_)[1])
    # acc_norm divides by the option's characters without the joining space, as lm-eval does
    assert n_short > n_long and n_short / (len(short) - 1) > n_long / (len(long_) - 1)  # precondition
    ex = MultipleChoice([(context, short), (context, long_)], 0)
    res = evaluate_multiple_choice(_ctx(model, tokenizer), [ex], shots=[]).metrics
    assert res["acc"] == 0.0  # more tokens -> lower summed LL
    ex = MultipleChoice([(context, " ab"), (context, " a b c d e f")], 1)
    n_a = len(encode_pair(tokenizer, context, " ab")[1])
    n_b = len(encode_pair(tokenizer, context, " a b c d e f")[1])
    expect_norm = int(n_b / len("a b c d e f") < n_a / len("ab"))
    res = evaluate_multiple_choice(_ctx(model, tokenizer), [ex], shots=[]).metrics
    assert res["acc"] == float(n_b < n_a) and res["acc_norm"] == float(expect_norm)


def test_few_shot_prefix_is_prepended(tokenizer):
    seen = []

    class Spy(PreferenceModel):
        def forward(self, tokens, caches=None, start_pos=0):
            seen.extend(tokenizer.decode(row) for row in tokens.tolist())
            return super().forward(tokens)

    shot = MultipleChoice([("Question: two?\nAnswer:", " 2"), ("Question: two?\nAnswer:", " 3")], 0)
    ex = MultipleChoice([("Question: one?\nAnswer:", " 1"), ("Question: one?\nAnswer:", " 9")], 0)
    evaluate_multiple_choice(_ctx(Spy(tokenizer.vocab_size), tokenizer), [ex], shots=[shot])
    assert any(s.startswith("Question: two?\nAnswer: 2\n\nQuestion: one?\nAnswer:") for s in seen)
