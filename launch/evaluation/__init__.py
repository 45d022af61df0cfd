"""Former home of the evaluation suite, now `launch.eval`. Kept so `import launch.evaluation.harness`
(lm-eval's `--include_path` / registry users) keeps working."""
