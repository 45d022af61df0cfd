"""The reproduction experiments (configs/sweeps/capacity*.yaml, growth_scalenet.yaml): seeds and
per-entry grids in sweep files, every committed sweep's dry expansion, the per-arm summaries
(mean ± std over seeds, learning-rate tuning, steps to a reference loss), the mixture tokenizer,
and a quick end-to-end smoke of the pipeline (corpus -> tokenizer -> seeded runs -> eval -> tables)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.data.facts import FactsArgs, fact_bits, mixture_tokenizer, params_to_hold, write_corpus
from launch.data.tokenizer import Tokenizer
from launch.report.plots import DEFAULT_LINE, value_lines
from launch.runtime.errors import ConfigError
from launch.sweep.__main__ import main as sweep_main
from launch.sweep.__main__ import selected
from launch.sweep.collect import collect
from launch.sweep.runner import plan
from launch.sweep.spec import load_sweep, run_config
from launch.sweep.summary import summarise

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "configs" / "sweeps"
TINY = REPO / "configs" / "tiny.yaml"
SWEEP_FILES = sorted(p for p in SWEEPS.glob("*.yaml") if "base" in (OmegaConf.load(p) or {}))


def write_sweep(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    body = {"base": str(TINY), "out": str(tmp_path / "runs"), **body}
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return path


def built(sweep, run):
    from launch.models.build import active_params, build_model

    with torch.device("meta"):
        model = build_model(run_config(sweep, run))
    return model.num_params(), active_params(model)


# ---------------------------------------------------------------------------------------------
# Seeds and per-entry grids


def test_seeds_replicate_every_run_and_grows_follow_their_seed(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "runs": [
                {"name": "base"},
                {
                    "name": "big",
                    "grow": {"from": "base", "strategy": "stack_copy", "depth": 4},
                    "grid": {"optim.lr": [0.001, 0.002]},
                },
            ],
            "seeds": [0, 7],
        },
    )
    sweep = load_sweep(path)
    names = [r.name for r in sweep.runs]
    assert names == [
        "base_seed-0",
        "base_seed-7",
        "big_lr-0.001_seed-0",
        "big_lr-0.001_seed-7",
        "big_lr-0.002_seed-0",
        "big_lr-0.002_seed-7",
    ]
    for r in sweep.runs:
        assert r.overrides["run.seed"] == r.seed and r.name == f"{r.arm}_seed-{r.seed}"
        if r.grow:
            assert r.grow.source == f"base_seed-{r.seed}" and r.group == "big"
            steps = plan(sweep, r)
            assert f"checkpoint={sweep.run_dir(f'base_seed-{r.seed}')}" in steps[0].args
    assert {r.arm for r in sweep.runs} == {"base", "big_lr-0.001", "big_lr-0.002"}
    assert sweep.get("big_lr-0.002_seed-7").overrides["optim.lr"] == 0.002


def test_seed_grid_axis_gives_arms_too(tmp_path):
    sweep = load_sweep(
        write_sweep(
            tmp_path, {"runs": [{"name": "a"}, {"name": "b", "optim.lr": 0.01}], "grid": {"run.seed": [1, 2]}}
        )
    )
    assert [(r.name, r.arm, r.seed) for r in sweep.runs] == [
        ("a_seed-1", "a", 1),
        ("a_seed-2", "a", 2),
        ("b_seed-1", "b", 1),
        ("b_seed-2", "b", 2),
    ]


def test_an_entry_s_own_seeds_replace_the_sweep_s(tmp_path):
    """More seeds for one noisy arm without rerunning the others; a grow entry may only use seeds
    its source trains."""
    body = {
        "runs": [
            {"name": "a"},
            {"name": "noisy", "optim.lr": 0.01, "seeds": [0, 1, 2, 3]},
            {"name": "g", "grow": {"from": "noisy", "strategy": "stack_copy", "depth": 4}, "seeds": [3]},
        ],
        "seeds": [0, 1],
    }
    sweep = load_sweep(write_sweep(tmp_path, body))
    assert [(r.name, r.arm, r.seed) for r in sweep.runs] == [
        ("a_seed-0", "a", 0), ("a_seed-1", "a", 1),
        ("noisy_seed-0", "noisy", 0), ("noisy_seed-1", "noisy", 1), ("noisy_seed-2", "noisy", 2), ("noisy_seed-3", "noisy", 3),
        ("g_seed-3", "g", 3),
    ]  # fmt: skip
    assert (
        "seeds" not in sweep.get("noisy_seed-3").overrides
        and sweep.get("noisy_seed-3").overrides["run.seed"] == 3
    )
    assert sweep.get("g_seed-3").grow.source == "noisy_seed-3"
    # without a sweep-wide list only the entry with seeds is replicated
    sweep = load_sweep(write_sweep(tmp_path, {"runs": [{"name": "a"}, {"name": "b", "seeds": [5]}]}))
    assert [(r.name, r.seed) for r in sweep.runs] == [("a", None), ("b_seed-5", 5)]
    body["runs"][2]["seeds"] = [7]
    with pytest.raises(ConfigError, match="g_seed-7 grows from 'noisy_seed-7'"):
        load_sweep(write_sweep(tmp_path, body))
    with pytest.raises(ConfigError, match="run b: seeds .* repeat a seed"):
        load_sweep(write_sweep(tmp_path, {"runs": [{"name": "b", "seeds": [1, 1]}]}))


def test_only_takes_run_names_and_arm_names(tmp_path):
    sweep = load_sweep(
        write_sweep(
            tmp_path, {"runs": [{"name": "a"}, {"name": "b"}, {"name": "c", "seeds": [7]}], "seeds": [0, 1]}
        )
    )
    assert selected(sweep, []) is None
    assert selected(sweep, ["a"]) == {"a_seed-0", "a_seed-1"}  # an arm: all its seeds
    assert selected(sweep, ["b_seed-1", "c"]) == {"b_seed-1", "c_seed-7"}
    with pytest.raises(ConfigError, match=r"no run or arm named a_seed-2, d; arms are a, b, c"):
        selected(sweep, ["a_seed-2", "a", "d"])


@pytest.mark.parametrize(
    "body, match",
    [
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"seeds": "0"}, "seeds must be a non-empty list"),
        ({"seeds": [0], "grid": {"run.seed": [1]}}, "not both"),
        ({"runs": [{"grid": {"optim.lr": [0.1]}}]}, "needs a name"),
        (
            {"runs": [{"name": "a", "grid": {"optim.lr": [0.1]}}], "grid": {"optim.warmup_steps": [1, 2]}},
            "cannot be combined",
        ),
        ({"report": {"plott": "values"}}, "unknown key"),
        ({"runs": [{"name": "a"}], "report": {"line": ["b"]}}, r"report.line names b, not arms"),
        (
            {"runs": [{"name": "a"}], "report": {"line": {"wide": ["a", "c"]}}},
            r"report.line.wide names c, not arms",
        ),
        ({"runs": [{"name": "a"}], "report": {"line": {"wide": "a"}}}, r"report.line.wide must be a list"),
    ],
)
def test_bad_seed_and_grid_specs(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(write_sweep(tmp_path, body))


# ---------------------------------------------------------------------------------------------
# The committed sweep files


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_committed_sweep_expands_dry(path, tmp_path, capsys):
    assert sweep_main([f"sweep={path}", "mode=dry", f"runs_dir={tmp_path / 'fresh'}"]) == 0  # every run new
    out = capsys.readouterr().out
    sweep = load_sweep(path)
    assert f"{len(sweep.runs)} runs" in out and out.count("-m launch.train") == len(sweep.runs)


def test_capacity_sweep_has_the_issue_arms():
    sweep = load_sweep(SWEEPS / "capacity.yaml")
    arms = {r.arm: r for r in sweep.runs}
    assert all(sorted(r.seed for r in sweep.runs if r.arm == a) == [0, 1, 2] for a in arms)
    configs = {a: run_config(sweep, r) for a, r in arms.items()}
    values = {a: c.memory.n_keys**2 for a, c in configs.items() if c.memory.layers}
    assert {16384, 65536, 262144, 1048576} <= set(values.values())
    assert all(c.memory.value_optimizer == "adamw" for c in configs.values())
    counts = {a: built(sweep, r) for a, r in arms.items()}
    dense_total, dense_active = counts["dense"]
    for a in ("memory_16k", "memory_64k", "memory_256k", "memory_1M"):
        assert abs(counts[a][1] / dense_active - 1) < 0.4  # equal active parameters up to the keys
    assert counts["dense_5M"][0] >= counts["memory_64k"][0]  # the denser comparison: more total params
    assert (
        abs(counts["dense_0.45M"][1] / counts["memory_1M"][1] - 1) < 0.02
    )  # dense at the 1M arm's active params
    assert all(
        c.memory.qk_norm and c.memory.heads * c.memory.knn == 128 for c in configs.values() if c.memory.layers
    )
    assert (
        configs["memory_64k_2layers_shared"].memory.shared
        and not configs["memory_64k_2layers_per_layer"].memory.shared
    )
    assert not configs["memory_64k_ungated"].memory.gated
    # the corpus is beyond the dense model at 2 bits/param; every fact ~100 statement exposures
    base = configs["dense"]
    assert params_to_hold(50_000) > dense_total
    assert base.data.mix[0]["ratio"] * base.train.steps * base.data.batch_size * base.data.seq_len > 1e9


@pytest.mark.parametrize(
    "name,grid,ranks",
    [
        ("growth_scalenet.yaml", {0.001, 0.002, 0.003, 0.005, 0.008, 0.012, 0.018}, {1, 4, 8}),
        ("growth_scalenet_long.yaml", {0.003, 0.005, 0.008, 0.012}, {1}),
    ],
)
def test_growth_sweep_tunes_every_arm_with_the_same_grid(name, grid, ranks):
    sweep = load_sweep(SWEEPS / name)
    groups: dict[str, set] = {}
    for r in sweep.runs:
        groups.setdefault(r.group, set()).add(r.overrides["optim.lr"])
    lrs = groups.pop("base_4L")
    assert len(lrs) == 1 and all(v == grid for v in groups.values())
    assert {
        r.grow.args.get("grow.adapter_rank") for r in sweep.runs if r.grow and r.grow.strategy == "scalenet"
    } == ranks
    steps = {r.group: r.overrides["train.steps"] for r in sweep.runs}
    assert steps["scratch_8L"] == 3 * steps["scalenet_r1"]  # scratch trains 3B, every grown arm B
    assert sweep.report.reference == "scratch_8L" and sweep.report.tune == ["optim.lr"]


# ---------------------------------------------------------------------------------------------
# Summaries (hand-made run directories)


def _fake(run_dir: Path, curve: list[tuple[int, float]], em: float) -> None:
    last = curve[-1][0]
    (run_dir / "checkpoints" / f"step_{last}").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{last}" / "trainer_state.json").write_text("{}")
    records = [{"step": s, "loss": v + 0.1, "tokens": 10 * s, "tokens_per_s": 100.0} for s, v in curve]
    records += [{"step": s, "val_loss": v, "val_ppl": math.exp(v)} for s, v in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text(
        json.dumps({"step": last, "tasks": {"qa": {"exact_match": em, "n": 10}}})
    )
    (run_dir / "sweep_steps.jsonl").write_text(
        json.dumps({"kind": "train", "exit": 0, "wall_s": 12.5, "peak_rss_mb": 300.0}) + "\n"
    )


def test_collect_means_stds_and_best_learning_rate(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "overrides": {"train.steps": 10},
            "runs": [
                {"name": "dense", "memory.layers": []},
                {"name": "wide", "grid": {"optim.lr": [0.001, 0.003]}},
            ],
            "seeds": [0, 1, 2],
            "eval": {"tasks": ["facts:qa.jsonl"]},
            "report": {"tune": ["optim.lr"], "metrics": ["qa/exact_match", "val_loss"]},
        },
    )
    sweep = load_sweep(path)
    ems = {"dense": [0.1, 0.2, 0.3], "wide_lr-0.001": [0.5, 0.5, 0.8], "wide_lr-0.003": [0.0, 0.1, 0.2]}
    losses = {"dense": 3.0, "wide_lr-0.001": 2.0, "wide_lr-0.003": 2.5}
    for r in sweep.runs:
        _fake(
            sweep.run_dir(r), [(5, losses[r.arm] + 1), (10, losses[r.arm] + r.seed * 0.1)], ems[r.arm][r.seed]
        )
    written = collect(sweep, tmp_path / "res")
    summary = {row["arm"]: row for row in csv.DictReader(written["summary"].open())}
    assert set(summary) == set(ems)
    for arm, vals in ems.items():
        assert float(summary[arm]["qa/exact_match"]) == pytest.approx(statistics.fmean(vals))
        assert float(summary[arm]["qa/exact_match_std"]) == pytest.approx(statistics.stdev(vals))
        assert summary[arm]["seeds"] == "3"
        assert float(summary[arm]["val_loss"]) == pytest.approx(losses[arm] + 0.1)
    assert summary["wide_lr-0.001"]["best"] == "True" and summary["wide_lr-0.003"]["best"] == "False"
    assert summary["dense"]["best"] == "True"  # alone in its group
    assert float(summary["dense"]["peak_rss_mb"]) == 300.0 and float(summary["dense"]["train_wall_s"]) == 12.5
    md = written["md"].read_text()
    assert "mean ± std over seeds [0, 1, 2]" in md and "0.2 ± 0.1" in md and "**best**" in md
    assert len(list(csv.DictReader(written["csv"].open()))) == 9


def test_collect_steps_to_reference_for_grown_arms(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "runs": [
                {"name": "base", "model.n_layers": 1, "train.steps": 20},
                {"name": "scratch", "model.n_layers": 2, "train.steps": 30},
                {
                    "name": "grown",
                    "grow": {"from": "base", "strategy": "stack_copy", "depth": 2},
                    "train.steps": 10,
                },
            ],
            "seeds": [0, 1],
            "report": {"plot": "curves", "reference": "scratch"},
        },
    )
    sweep = load_sweep(path)
    curves = {
        "base": [(10, 4.0), (20, 3.5)],
        "scratch": [(10, 4.0), (20, 3.2), (30, 3.0)],
        "grown": [(2, 3.4), (4, 3.1), (6, 2.95), (10, 2.9)],
    }
    for r in sweep.runs:
        _fake(sweep.run_dir(r), curves[r.arm], 0.0)
        layers = {"base": 1, "scratch": 2, "grown": 2}[r.arm]
        (sweep.run_dir(r) / "config.yaml").write_text(
            OmegaConf.to_yaml({"model": {"n_layers": layers, "dim": 16, "n_heads": 2, "vocab_size": 64}})
        )
    written = collect(sweep, tmp_path / "g")
    summary = {row["arm"]: row for row in csv.DictReader(written["summary"].open())}
    assert summary["grown"]["steps_to_target"] == "6"  # first step at or below scratch's final 3.0
    assert summary["grown"]["equiv_steps_to_target"] == "16"  # + 20 base steps at half the depth
    assert summary["scratch"]["steps_to_target"] == "30" and summary["base"]["steps_to_target"] == ""
    assert summary["grown"]["equiv_steps_used"] == "20"  # 10 steps + 20 base steps at half the depth
    assert summary["grown"]["reference_steps_matched"] == ""  # 2.9 is below anything scratch reached
    assert (
        summary["base"]["reference_steps_matched"] == "20"
    )  # base ends at 3.5: scratch is at 4.0 at step 10, 3.2 at 20

    assert "Target: `scratch`'s final mean val loss 3.0000" in written["md"].read_text()
    if "png" in written:
        assert written["png"].stat().st_size > 1000


def test_summary_metrics_come_from_finished_runs_only(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"runs": [{"name": "a"}, {"name": "b"}], "seeds": [0, 1]}))
    state = {"a_seed-0": "done", "a_seed-1": "partial", "b_seed-0": "partial", "b_seed-1": "new"}
    rows = [
        {"run": r.name, "state": state[r.name], "params": 7, "val_ppl": 10.0 * (i + 1)}
        for i, r in enumerate(sweep.runs)
    ]
    a, b = summarise(sweep, rows, ["val_ppl"])
    assert (a["seeds"], a["of"], a["val_ppl"], a["val_ppl_std"]) == (
        1,
        2,
        10.0,
        0.0,
    )  # the partial seed's 20 left out
    assert (b["seeds"], b["params"], b["val_ppl"]) == (0, 7, None)  # nothing finished: constants, no figures


def test_value_lines_group_memory_arms_by_label_and_sort_by_values():
    summary = [
        {"arm": "dense"},
        {"arm": "m1M", "values": 1 << 20},
        {"arm": "m16k", "values": 1 << 14},
        {"arm": "w1M", "values": 1 << 20},
        {"arm": "w16k", "values": 1 << 14},
        {"arm": "ablation", "values": 1 << 16},
    ]
    arms = lambda ss: [s["arm"] for s in ss]  # noqa: E731
    lines, others = value_lines(
        summary, {"narrow": ["m1M", "m16k"], "wide": ["w16k", "w1M"], "none run": ["x"]}
    )
    assert {k: arms(v) for k, v in lines.items()} == {"narrow": ["m16k", "m1M"], "wide": ["w16k", "w1M"]}
    assert arms(others) == ["ablation"]  # a memory arm on no line: a lone marker; dense: neither
    lines, others = value_lines(summary, ["m16k", "m1M"])  # the one-line form
    assert list(lines) == [DEFAULT_LINE] and arms(lines[DEFAULT_LINE]) == ["m16k", "m1M"]
    assert arms(others) == ["w1M", "w16k", "ablation"]
    lines, others = value_lines(summary, [])  # empty: every memory arm on one line
    assert arms(lines[DEFAULT_LINE]) == ["m16k", "w16k", "ablation", "m1M", "w1M"] and others == []


def test_collect_reports_memory_slot_use_of_memory_runs_only(tmp_path):
    body = {
        "overrides": {"train.steps": 10},
        "runs": [{"name": "dense", "memory.layers": []}, {"name": "mem"}],
        "seeds": [0, 1],
    }
    sweep = load_sweep(write_sweep(tmp_path, body))
    for r in sweep.runs:
        _fake(sweep.run_dir(r), [(10, 4.0)], 0.1)
        if r.arm == "mem":  # two logging windows: the last one counts
            frac = 0.2 + 0.1 * r.seed
            windows = [{"step": 5, "loss": 4.5, "mem_slots_read_frac": 0.9, "mem_usage_entropy": 0.9}]
            windows += [{"step": 10, "loss": 4.1, "mem_slots_read_frac": frac, "mem_usage_entropy": 0.5}]
            with (sweep.run_dir(r) / "metrics.jsonl").open("a") as f:
                f.write("".join(json.dumps(w) + "\n" for w in windows))
    written = collect(sweep, tmp_path / "m")
    runs = {row["run"]: row for row in csv.DictReader(written["csv"].open())}
    assert (
        float(runs["mem_seed-1"]["slots_read"]) == pytest.approx(0.3)
        and runs["mem_seed-0"]["usage_entropy"] == "0.5"
    )
    assert runs["dense_seed-0"]["slots_read"] == ""
    summary = {row["arm"]: row for row in csv.DictReader(written["summary"].open())}
    assert float(summary["mem"]["slots_read"]) == pytest.approx(0.25) and summary["dense"]["slots_read"] == ""
    # a sweep without memory runs gets no such columns
    (tmp_path / "d").mkdir()
    sweep = load_sweep(write_sweep(tmp_path / "d", {"runs": [{"name": "dense", "memory.layers": []}]}))
    _fake(sweep.run_dir(sweep.runs[0]), [(10, 4.0)], 0.1)
    assert "slots_read" not in collect(sweep, tmp_path / "d" / "res")["csv"].read_text()


def _load_benchmark(name: str):
    import importlib

    return importlib.import_module(f"experiments.{name}")


def test_facts_by_attribute_against_hand_counts(tmp_path):
    """experiments/facts_by_attribute.py: EM per attribute per run, mean ± std per arm, majority floors,
    runs without predictions counted as missing, and a clear error for predictions of another file."""
    fba = _load_benchmark("facts_by_attribute")
    qa = [
        {"question": "q1", "answer": "x", "attribute": "city"},
        {"question": "q2", "answer": "x", "attribute": "city"},
        {"question": "q3", "answer": "y", "attribute": "city"},
        {"question": "q4", "answer": "1", "attribute": "year"},
    ]
    qa_path = tmp_path / "qa.jsonl"
    qa_path.write_text("".join(json.dumps(r) + "\n" for r in qa))
    path = write_sweep(tmp_path, {"runs": [{"name": "a"}, {"name": "b", "seeds": [0]}], "seeds": [0, 1]})
    ems = {"a_seed-0": [1, 0, 0, 1], "a_seed-1": [1, 1, 1, 0]}  # b_seed-0 has no predictions
    for run, em in ems.items():
        d = tmp_path / "runs" / run / "eval" / "predictions"
        d.mkdir(parents=True)
        (d / "facts_seen.jsonl").write_text(
            "".join(json.dumps({"question": q["question"], "em": e}) + "\n" for q, e in zip(qa, em))
        )
    attributes, floors, rows = fba.by_attribute(path, "facts_seen", qa_path)
    assert attributes == ["city", "year"] and floors == {"city": pytest.approx(2 / 3), "year": 1.0}
    a, b = rows
    assert a["seeds"] == "2/2" and b["seeds"] == "0/1" and b["city"] is None
    assert a["city"] == pytest.approx((1 / 3 + 1) / 2) and a["year"] == pytest.approx(0.5)
    assert a["year_std"] == pytest.approx(statistics.stdev([1, 0]))
    assert a["all"] == pytest.approx(((1 / 3 + 1) / 2 + (1 + 0) / 2) / 2)
    out = tmp_path / "res" / "by_attr"
    assert (
        fba.main(["--sweep", str(path), "--task", "facts_seen", "--qa", str(qa_path), "--out", str(out)]) == 0
    )
    md = Path(f"{out}.md").read_text()
    assert (
        "| majority answer | | 0.667 | 1.000 | 0.833 |" in md
        and "| a | 2/2 | 0.667 ± 0.471 | 0.500 ± 0.707 |" in md
    )
    with Path(f"{out}.csv").open() as f:
        assert next(csv.DictReader(f))["arm"] == "majority_answer"
    qa_path.write_text("".join(json.dumps({**r, "question": r["question"] + "?"}) + "\n" for r in qa))
    with pytest.raises(ValueError, match="row 0 answers 'q1', the QA file asks 'q1\\?'"):
        fba.by_attribute(path, "facts_seen", qa_path)


# ---------------------------------------------------------------------------------------------
# Facts: capacity estimate and the mixture tokenizer


def test_value_trend_against_hand_computed_statistics(tmp_path):
    """experiments/value_trend.py: slope per doubling, P(monotonic) and the ratio to a baseline."""
    vt = _load_benchmark("value_trend")
    assert vt.ols_slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert vt.percentile([0.0, 1.0, 2.0, 3.0], 0.5) == pytest.approx(1.5)
    # separated arms: every resample rises; slope over log2(values) = 0.1 per doubling x 2 doublings apart
    r = vt.trend([(1 << 18, [0.5, 0.5]), (1 << 14, [0.1, 0.1]), (1 << 16, [0.3, 0.3])], [0.1, 0.3], boot=500)
    assert [a["values"] for a in r["arms"]] == [1 << 14, 1 << 16, 1 << 18]  # sorted by values
    assert r["slope_per_doubling"] == pytest.approx(0.1) and r["slope_ci95"] == pytest.approx([0.1, 0.1])
    assert r["means_rise"] and r["p_monotonic"] == 1.0
    assert r["ratio_largest_to_baseline"] == pytest.approx(0.5 / 0.2)
    lo, hi = r["ratio_ci95"]  # baseline resamples: means 0.1, 0.2 or 0.3
    assert lo == pytest.approx(0.5 / 0.3) and hi == pytest.approx(0.5 / 0.1)
    # overlapping seeds: the means rise, but not in every resample
    r = vt.trend([(4, [0.1, 0.4]), (16, [0.2, 0.35])], None, boot=2000)
    assert r["means_rise"] and 0.3 < r["p_monotonic"] < 0.9 and "ratio_ci95" not in r
    with pytest.raises(ValueError, match="two different numbers of values"):
        vt.trend([(4, [0.1]), (4, [0.2])], None, boot=0)

    # end to end on a collect-style table: unfinished runs are left out
    path = write_sweep(
        tmp_path,
        {"runs": [{"name": "dense", "memory.layers": []}, {"name": "m16"}, {"name": "m64"}], "seeds": [0, 1]},
    )
    table = tmp_path / "t.csv"
    rows = [("dense_seed-0", "", "done", 0.1), ("dense_seed-1", "", "done", 0.2), ("m16_seed-0", 16, "done", 0.2),
            ("m16_seed-1", 16, "done", 0.3), ("m64_seed-0", 64, "done", 0.6), ("m64_seed-1", 64, "partial", 0.9)]  # fmt: skip
    table.write_text(
        "run,values,state,facts_seen/exact_match\n" + "".join(f"{r},{v},{st},{m}\n" for r, v, st, m in rows)
    )
    out = tmp_path / "res" / "trend"
    argv = [
        "--csv",
        str(table),
        "--sweep",
        str(path),
        "--arms",
        "m64,m16",
        "--baseline",
        "dense",
        "--boot",
        "200",
        "--out",
        str(out),
    ]
    assert vt.main(argv) == 0
    result = json.loads(Path(f"{out}.json").read_text())
    assert result["arm_names"] == ["m16", "m64"] and result["arms"][1]["runs"] == [
        0.6
    ]  # the partial seed is not a result
    assert result["slope_per_doubling"] == pytest.approx(0.175)  # least squares of (4, .2), (4, .3), (6, .6)
    assert result["ratio_largest_to_baseline"] == pytest.approx(0.6 / 0.15)
    assert "| m64 | 64 | 0.600 | 0.600 ± 0.000 |" in Path(f"{out}.md").read_text()
    with pytest.raises(SystemExit, match="no finished runs of nope"):
        vt.main(argv[:5] + ["nope"] + argv[6:])
    with pytest.raises(SystemExit, match="--boot 0: the report's intervals need at least one"):
        vt.main(argv[:-4] + ["--boot", "0"])
    with pytest.raises(SystemExit, match="dense: not memory arms"):
        vt.main(argv[:5] + ["dense,m16"] + argv[6:])


def test_capacity_estimate():
    per_entity = math.log2(30) + math.log2(100) + math.log2(24) + math.log2(20) + math.log2(12)
    assert fact_bits(10) == pytest.approx(10 * per_entity)
    assert params_to_hold(1000) == math.ceil(1000 * per_entity / 2) and params_to_hold(
        1000, 1.0
    ) == math.ceil(1000 * per_entity)


def test_mixture_tokenizer_encodes_the_facts_shorter(tmp_path):
    """Trained on plays + facts, the tokenizer spends fewer pieces on the fact text than one
    trained on the plays alone (the trainer's default: data.train only)."""
    from launch.data.sources import load_documents
    from launch.data.tokenizer import train_tokenizer

    paths = write_corpus(FactsArgs(out=str(tmp_path / "f"), n_entities=60, repeats=1))
    plays = tmp_path / "plays.txt"
    plays.write_text("\n".join(load_documents("shakespeare", "train"))[:200_000])
    mixed = Tokenizer(mixture_tokenizer([str(plays), str(paths["train"])], tmp_path / "mix.model", 512))
    alone = Tokenizer(train_tokenizer(load_documents(str(plays), "train"), tmp_path / "plays.model", 512))
    facts = paths["train"].read_text()
    assert len(mixed.encode(facts)) < 0.95 * len(alone.encode(facts))
    assert mixed.decode(mixed.encode(facts)) == facts


# ---------------------------------------------------------------------------------------------
# Quick end-to-end smoke: the capacity pipeline at toy size (a few seconds per process)


@pytest.mark.slow
def test_quick_pipeline_smoke(tmp_path, capsys):
    corpus = tmp_path / "facts"
    assert (
        __import__("launch.facts", fromlist=["main"]).main(
            [
                f"out={corpus}",
                "n_entities=10",
                "repeats=1",
                "tokenizer_vocab=400",
                f"tokenizer_with=[{corpus / 'train.txt'}]",
            ]
        )
        == 0
    )
    path = write_sweep(
        tmp_path,
        {
            "overrides": {
                "data.train": str(corpus / "train.txt"),
                "data.val": str(corpus / "train.txt"),
                "data.tokenizer": str(corpus / "tokenizer.model"),
                "model.vocab_size": 400,
                "model.dim": 32,
                "data.batch_size": 4,
                "data.val_sequences": 4,
                "train.steps": 2,
                "train.ckpt_every": 2,
                "train.val_every": 2,
                "train.log_every": 1,
                "memory.n_keys": 4,
                "memory.heads": 2,
                "memory.k_dim": 16,
                "memory.knn": 2,
                "memory.value_optimizer": "adamw",
            },
            "runs": [{"name": "dense"}, {"name": "memory", "memory.layers": [1]}],
            "seeds": [0, 1],
            "eval": {
                "tasks": [f"facts:{corpus / 'qa.jsonl'}?name=facts_heldout"],
                "args": {"eval.max_new_tokens": 2, "eval.limit": 4, "eval.sample_tokens": 0},
            },
            "report": {"plot": "values"},
            "local": {"env": {"OMP_NUM_THREADS": "1"}},
        },
    )
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assert sweep_main([f"sweep={path}", "mode=local"]) == 0
    assert sweep_main(["collect", f"sweep={path}", f"out={tmp_path / 'res'}"]) == 0
    summary = {row["arm"]: row for row in csv.DictReader((tmp_path / "res_summary.csv").open())}
    assert set(summary) == {"dense", "memory"} and all(s["seeds"] == "2" for s in summary.values())
    assert summary["memory"]["values"] == "16" and summary["dense"]["values"] == ""
    assert float(summary["dense"]["peak_rss_mb"]) > 50 and "facts_heldout/exact_match" in summary["dense"]


def test_training_documents_cover_the_mixture(tmp_path):
    from launch.config import DataConfig
    from launch.data.stream import training_documents

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("plays text\n")
    b.write_text("Nima Solk was born in Oslo.\n")
    # Streamed (the tokenizer samples from it without holding the corpus): a generator of the texts.
    docs = training_documents(DataConfig(train=str(a), mix=[{"path": str(b), "ratio": 0.5}]))
    assert list(docs) == ["plays text\n", "Nima Solk was born in Oslo.\n"]
    assert list(training_documents(DataConfig(train=str(a)))) == ["plays text\n"]


def test_majority_baseline():
    from launch.data.facts import ATTRIBUTES, majority_em

    people = [
        {a: "x" for a in ATTRIBUTES},
        {a: "x" for a in ATTRIBUTES},
        {**{a: "x" for a in ATTRIBUTES}, "employer": "y"},
        {a: "z" for a in ATTRIBUTES},
    ]
    assert majority_em(people) == pytest.approx(sum([3, 3, 3, 2, 3]) / 20)
