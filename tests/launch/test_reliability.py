"""Reliability battery, part 1: bad values, bad eval inputs, unsafe outputs, missing clusters.

Every attack must end in one line on stderr naming the culprit, exit status 2, no traceback, and
every kept checkpoint byte-identical. Entry points run in-process (`run_cli(main, argv)`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launch import facts, grow, tokenizer
from launch.convert import __main__ as convert
from launch.eval import __main__ as eval_cli
from launch.runtime.outputs import MARKER
from launch.sweep import __main__ as sweep
from launch.train import __main__ as train_cli

from ..conftest import REPO, TINY  # noqa: TID252
from ._reliability import checkpoint_digest, cli_error, digest

FIXTURES = REPO / "tests" / "fixtures" / "eval"


# ---------------------------------------------------------------------------------------------
# Config values: launch.config.validate (train) and validate_eval (eval)

BAD_TRAIN_VALUES = [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.beta1=1.0", "optim.beta1"),
    ("optim.beta1=-0.1", "optim.beta1"),
    ("optim.beta2=1.5", "optim.beta2"),
    ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.warmup_steps=-3", "optim.warmup_steps"),
    ("train.ckpt_every=-1", "train.ckpt_every"),
    ("train.val_every=-1", "train.val_every"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.steps=0", "train.steps"),
    ("data.val_sequences=0", "data.val_sequences"),
    ("memory.value_lr=-1e-3", "memory.value_lr"),
    ("memory.knn=0", "memory.knn"),
    ("memory.k_dim=1", "memory.k_dim"),
    ("model.norm_eps=0", "model.norm_eps"),
    ("model.rope_theta=-1", "model.rope_theta"),
    ("eval.sample_top_k=0", "eval.sample_top_k"),
    ("eval.sample_top_k=-2", "eval.sample_top_k"),
    ("eval.max_new_tokens=-5", "eval.max_new_tokens"),
    ("eval.shots=-2", "eval.shots"),
    ("eval.every=-1", "eval.every"),
    ("eval.sample_temperature=-0.5", "eval.sample_temperature"),
    ("eval.sample_top_p=0", "eval.sample_top_p"),
    ("eval.sample_top_p=1.5", "eval.sample_top_p"),
    ("eval.batch_size=0", "eval.batch_size"),
]


@pytest.mark.parametrize("override,key", BAD_TRAIN_VALUES, ids=[o for o, _ in BAD_TRAIN_VALUES])
def test_bad_train_value_is_one_line(capsys, tmp_path, override, key):
    line = cli_error(capsys, train_cli.main, [f"config={TINY}", f"run.dir={tmp_path / 'run'}", override], key)
    assert "expected" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "override,key",
    [
        ("eval.sample_top_k=0", "eval.sample_top_k"),
        ("eval.sample_top_p=0", "eval.sample_top_p"),
        ("eval.max_new_tokens=-5", "eval.max_new_tokens"),
        ("eval.shots=-2", "eval.shots"),
        ("eval.limit=0", "eval.limit"),
        ("eval.batch_size=0", "eval.batch_size"),
    ],
)
def test_bad_eval_value_is_one_line(capsys, tmp_path, override, key):
    cli_error(capsys, eval_cli.main, [f"checkpoint={tmp_path}", "tasks=[shakespeare]", override], key)


def test_run_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("precious")
    cli_error(
        capsys,
        train_cli.main,
        [f"config={TINY}", f"run.dir={tmp_path / 'f'}"],
        "run.dir",
        str(tmp_path / "f"),
    )
    cli_error(
        capsys,
        train_cli.main,
        [f"config={TINY}", f"run.dir={tmp_path / 'f' / 'sub'}"],
        "run.dir",
        "is a file",
    )
    assert (tmp_path / "f").read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# Eval inputs: labels, encodings


def _eval_error(capsys, ckpt: Path, spec: str, *culprits: str) -> str:
    return cli_error(
        capsys,
        eval_cli.main,
        [f"checkpoint={ckpt}", f"tasks=[{spec}]", "eval.sample_tokens=0", "progress=false"],
        *culprits,
    )


PIQA = {"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}
BAD_TASK_ROWS = [
    ("piqa", {**PIQA, "label": 1.9}, "1.9"),
    ("piqa", {**PIQA, "label": True}, "True"),
    ("piqa", {**PIQA, "label": "one"}, "one"),
    ("piqa", {**PIQA, "label": 2}, "out of range"),
    ("hellaswag", {"ctx": "He", "endings": ["a", "b"], "label": 0.5}, "0.5"),
    ("boolq", {"question": "q", "passage": "p", "label": False}, "False"),
]


@pytest.mark.parametrize("fmt,row,culprit", BAD_TASK_ROWS, ids=[f"{f}-{c}" for f, _, c in BAD_TASK_ROWS])
def test_bad_multiple_choice_label(capsys, tmp_path, tiny_checkpoint, fmt, row, culprit):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text(json.dumps(row) + "\n")
    before = checkpoint_digest(tiny_checkpoint)
    _eval_error(capsys, tiny_checkpoint, f"{fmt}:{path}", f"{path}:1", culprit)
    assert checkpoint_digest(tiny_checkpoint) == before


def test_integral_labels_still_parse():
    from launch.eval.tasks import FORMATS

    for label in (1, "1", 1.0):
        assert FORMATS["piqa"].parse({**PIQA, "label": label}).label == 1


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_non_utf8_task_file(capsys, tmp_path, tiny_checkpoint, kind):
    if kind == "jsonl":
        path = tmp_path / "piqa.jsonl"
        path.write_bytes(json.dumps({**PIQA, "label": 0}).encode() + b"\n" + b'{"goal": "caf\xe9"}\n')
        _eval_error(capsys, tiny_checkpoint, f"piqa:{path}", f"{path}:2", "UTF-8")
    else:
        path = tmp_path / "doc.txt"
        path.write_bytes(b"plain text then \xff\xfe binary")
        _eval_error(capsys, tiny_checkpoint, f"text:{path}", str(path), "UTF-8", "16")


# ---------------------------------------------------------------------------------------------
# Output directories (launch.outputs): never delete a source or anything the command did not write


@pytest.fixture
def hf_export(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert convert.main(["to-hf", f"checkpoint={tiny_checkpoint}", f"out={out}"]) == 0
    return out


@pytest.mark.parametrize("where", ["run", "checkpoint", "inside", "parent"])
def test_to_hf_never_touches_its_source(capsys, tiny_checkpoint, where):
    step = tiny_checkpoint / "checkpoints" / "step_20"
    out = {
        "run": tiny_checkpoint,
        "checkpoint": step,
        "inside": step / "hf",
        "parent": tiny_checkpoint.parent,
    }[where]
    before = digest(tiny_checkpoint)
    cli_error(
        capsys,
        convert.main,
        ["to-hf", f"checkpoint={tiny_checkpoint}", f"out={out}", "overwrite=true"],
        f"out={out}",
        "source",
    )
    assert digest(tiny_checkpoint) == before
    assert not (step / "hf").exists()


def test_overwrite_replaces_only_an_own_export(capsys, tiny_checkpoint, hf_export, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = ["to-hf", f"checkpoint={tiny_checkpoint}"]
    cli_error(capsys, convert.main, [*args, f"out={foreign}"], f"out={foreign}", "overwrite=true")
    cli_error(
        capsys,
        convert.main,
        [*args, f"out={foreign}", "overwrite=true"],
        f"out={foreign}",
        "not written by launch.convert to-hf",
    )
    assert digest(foreign) == {"notes.txt": digest(foreign)["notes.txt"]}
    # an earlier export is recognised by its marker and replaced whole
    cli_error(capsys, convert.main, [*args, f"out={hf_export}"], "overwrite=true")
    (hf_export / "stale.txt").write_text("from before")
    assert convert.main([*args, f"out={hf_export}", "overwrite=true"]) == 0
    assert not (hf_export / "stale.txt").exists() and (hf_export / "config.json").is_file()
    assert json.loads((hf_export / MARKER).read_text())["command"] == "launch.convert to-hf"
    # ...but an export of another command is not
    cli_error(
        capsys,
        grow.main,
        [f"checkpoint={tiny_checkpoint}", f"out={hf_export}", "grow.strategy=stack_copy", "overwrite=true"],
        "not written by launch.grow",
    )


def test_from_hf_and_grow_refuse_their_sources(capsys, tiny_checkpoint, hf_export):
    before = digest(hf_export)
    for out in (hf_export, hf_export / "sub", hf_export.parent):
        cli_error(
            capsys,
            convert.main,
            ["from-hf", f"hf={hf_export}", f"out={out}", "overwrite=true"],
            f"out={out}",
            "source",
        )
    assert digest(hf_export) == before
    before = digest(tiny_checkpoint)
    for out in (tiny_checkpoint, tiny_checkpoint / "checkpoints" / "step_20" / "g"):
        cli_error(
            capsys,
            grow.main,
            [f"checkpoint={tiny_checkpoint}", f"out={out}", "grow.strategy=stack_copy", "overwrite=true"],
            f"out={out}",
            "source",
        )
    assert digest(tiny_checkpoint) == before


@pytest.mark.parametrize("command", ["to-hf", "from-hf", "grow", "facts", "eval"])
def test_out_is_a_regular_file(capsys, tiny_checkpoint, hf_export, tmp_path, command):
    out = tmp_path / "a_file"
    out.write_text("precious")
    main, argv = {
        "to-hf": (convert.main, ["to-hf", f"checkpoint={tiny_checkpoint}"]),
        "from-hf": (convert.main, ["from-hf", f"hf={hf_export}"]),
        "grow": (grow.main, [f"checkpoint={tiny_checkpoint}", "grow.strategy=stack_copy"]),
        "facts": (facts.main, ["n_entities=3"]),
        "eval": (eval_cli.main, [f"checkpoint={tiny_checkpoint}", "tasks=[shakespeare]"]),
    }[command]
    cli_error(
        capsys,
        main,
        [*argv, f"out={out}", "overwrite=true"] if command != "eval" else [*argv, f"out={out}"],
        f"out={out}",
        "file",
    )
    assert out.read_text() == "precious"


def test_facts_refuses_a_non_empty_directory(capsys, tmp_path):
    out = tmp_path / "facts"
    out.mkdir()
    (out / "train.txt").write_text("my own corpus")
    cli_error(capsys, facts.main, [f"out={out}", "n_entities=3"], f"out={out}", "overwrite=true")
    cli_error(
        capsys, facts.main, [f"out={out}", "n_entities=3", "overwrite=true"], "not written by launch.facts"
    )
    assert (out / "train.txt").read_text() == "my own corpus"
    shutil.rmtree(out)
    assert facts.main([f"out={out}", "n_entities=3"]) == 0
    first = (out / "facts.jsonl").read_text()
    cli_error(capsys, facts.main, [f"out={out}", "n_entities=4"], "overwrite=true")
    assert facts.main([f"out={out}", "n_entities=4", "overwrite=true"]) == 0
    assert (out / "facts.jsonl").read_text() != first


def test_tokenizer_refuses_an_existing_file(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about cats and dogs" for i in range(200)))
    out = tmp_path / "tok.model"
    out.write_bytes(b"someone else's model")
    args = [f"data.train={corpus}", "vocab_size=320", f"out={out}"]
    cli_error(capsys, tokenizer.main, args, f"out={out}", "overwrite=true")
    assert out.read_bytes() == b"someone else's model"
    cli_error(capsys, tokenizer.main, [*args[:2], f"out={tmp_path}"], "is a directory")
    assert tokenizer.main([*args, "overwrite=true"]) == 0
    assert out.read_bytes() != b"someone else's model"


# ---------------------------------------------------------------------------------------------
# Missing resources


def test_sweep_slurm_without_a_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    spec = REPO / "configs" / "sweeps"
    sweep_file = spec / "memory_ablations.yaml"
    cli_error(
        capsys,
        sweep.main,
        [f"sweep={sweep_file}", "mode=slurm", f"runs_dir={tmp_path / 'runs'}"],
        "mode=slurm",
        "sbatch",
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["grow", "from-hf"])
def test_truncated_weights_are_named(capsys, tiny_checkpoint, hf_export, tmp_path, command):
    if command == "grow":
        src = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint / "checkpoints" / "step_20", src)
        argv, main = [f"checkpoint={src}", f"out={tmp_path / 'out'}", "grow.strategy=stack_copy"], grow.main
    else:
        src = tmp_path / "hf"
        shutil.copytree(hf_export, src)
        argv, main = ["from-hf", f"hf={src}", f"out={tmp_path / 'out'}"], convert.main
    # a checkpoint's weights are DCP shard files under state/ (the largest one); an export's one safetensors file
    weights = (
        max((src / "state").glob("*.distcp"), key=lambda p: p.stat().st_size)
        if command == "grow"
        else src / "model.safetensors"
    )
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    cli_error(capsys, main, argv, str(weights), "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "index",
    [
        '{"weight_map": {"a": "model-0',
        '{"metadata": {}}',
        '{"weight_map": {"a": "../elsewhere.safetensors"}}',
    ],
)
def test_damaged_safetensors_index_is_named(capsys, hf_export, tmp_path, index):
    src = tmp_path / "hf"
    shutil.copytree(hf_export, src)
    (src / "model.safetensors.index.json").write_text(index)  # torn, no weight_map, a path outside the export
    cli_error(
        capsys,
        convert.main,
        ["from-hf", f"hf={src}", f"out={tmp_path / 'out'}"],
        "model.safetensors.index.json",
    )
    assert not (tmp_path / "out").exists()


def test_rope_scaling_next_to_default_rope_parameters(capsys, hf_export, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_export, src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(config))
    cli_error(
        capsys, convert.main, ["from-hf", f"hf={src}", f"out={tmp_path / 'out'}"], "rope_scaling", "linear"
    )


def test_a_failed_write_leaves_the_previous_output_whole(tmp_path):
    from launch.runtime.errors import UserError
    from launch.runtime.outputs import output_dir

    out = tmp_path / "out"
    with output_dir(out, command="test") as tmp:
        (tmp / "a.txt").write_text("first")
    before = digest(out)
    with pytest.raises(RuntimeError), output_dir(out, command="test", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk died")
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp left
    with pytest.raises(UserError, match="not written by other"):
        output_dir(out, command="other", overwrite=True).__enter__()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 500, b"trainer_spec {"])
def test_garbage_tokenizer_model_is_one_line(capsys, tmp_path, content):
    bad = tmp_path / "tok.model"
    bad.write_bytes(content)
    run = tmp_path / "run"
    cli_error(
        capsys,
        train_cli.main,
        [f"config={TINY}", f"data.tokenizer={bad}", f"run.dir={run}", "train.steps=1"],
        str(bad),
        "sentencepiece",
    )
    assert not (run / "checkpoints").exists()
