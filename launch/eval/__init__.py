"""The QA evaluation suite behind `python -m launch.eval`.

One file per concept: `tasks` (the format registry and task specs), `qa_metrics` (SQuAD-style
answer normalisation, exact match, F1), `scoring` (batched log-likelihoods and rolling
perplexity windows), `suite` (run tasks, write results) and `harness` (the lm-evaluation-harness
adapter, needs the `[eval]` extra). Generation lives in `launch.models.generate`.
"""
