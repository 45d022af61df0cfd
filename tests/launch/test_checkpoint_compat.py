"""Checkpoints written by earlier code still load, through every reader: committed fixtures made by the
code of commit b68f6a4 (tests/fixtures/checkpoints/make_fixtures.py says how), one in the DCP format
launch.train wrote then, one in the single-file format of the versions before DCP. Each holds the
logits that code computed from it, so a reader that loads without error but gets a tensor wrong fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.legacy import MODEL_FILE
from launch.checkpoint.load import load_checkpoint
from launch.checkpoint.paths import list_checkpoints, resolve_checkpoint
from launch.checkpoint.read import checkpoint_problem, is_dcp_checkpoint, read_model_state, read_trainer_state
from launch.config import config_from_file
from launch.models.build import build_model
from launch.train.optim import build_optimizers

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
DCP_RUN = FIXTURES / "dcp_b68f6a4"
LEGACY_RUN = FIXTURES / "legacy_b68f6a4"


def expected(run: Path) -> dict:
    return json.loads((run / "expected.json").read_text())


def probe_logits(model: torch.nn.Module, exp: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor(exp["probe"]))[0, :, :32]


def fixture_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def fixtures_stay_untouched():
    """Reading must never write into a checkpoint (no manifest added to the legacy one, no prune)."""
    before = {run: fixture_files(run) for run in (DCP_RUN, LEGACY_RUN)}
    with torch.random.fork_rng():  # Checkpointer.load restores the saved RNG state
        yield
    assert {run: fixture_files(run) for run in (DCP_RUN, LEGACY_RUN)} == before


@pytest.mark.parametrize(("run", "step", "dcp"), [(DCP_RUN, 2, True), (LEGACY_RUN, 3, False)])
def test_found_and_intact(run, step, dcp):
    path = run / "checkpoints" / f"step_{step}"
    assert list_checkpoints(run) == [(step, path)]
    assert Checkpointer(run).latest_intact() == path == resolve_checkpoint(run)
    assert checkpoint_problem(path) is None and is_dcp_checkpoint(path) is dcp
    assert (path / MODEL_FILE).is_file() is not dcp
    assert read_trainer_state(path)["step"] == step


@pytest.mark.parametrize("run", [DCP_RUN, LEGACY_RUN])
def test_load_checkpoint_gives_the_logits_the_old_code_gave(run):
    exp = expected(run)
    loaded = load_checkpoint(run)  # a run directory: its newest intact checkpoint
    assert loaded.step == exp["step"]
    torch.testing.assert_close(
        probe_logits(loaded.model, exp), torch.tensor(exp["logits"]), rtol=1e-5, atol=1e-5
    )
    again = build_model(loaded.config)
    read_model_state(loaded.path, again)
    torch.testing.assert_close(probe_logits(again, exp), torch.tensor(exp["logits"]), rtol=1e-5, atol=1e-5)


def test_a_dcp_checkpoint_of_b68f6a4_resumes_training():
    path = resolve_checkpoint(DCP_RUN)
    cfg = config_from_file(path / "config.yaml")
    model = build_model(cfg)
    optimizers = build_optimizers(model, cfg)
    state = Checkpointer(DCP_RUN, cfg.train.keep_last).load(path, model, optimizers)
    assert state["step"] == 2 and state["data"]["consumed"] == 8
    exp = expected(DCP_RUN)
    torch.testing.assert_close(probe_logits(model, exp), torch.tensor(exp["logits"]), rtol=1e-5, atol=1e-5)
    moments = [s for opt in optimizers for s in opt.state.values() if "exp_avg" in s]
    assert moments and all(int(s["step"]) == 2 for s in moments)  # the optimizer state came back too


def test_a_single_file_checkpoint_resumes_with_its_optimizer_state():
    path = resolve_checkpoint(LEGACY_RUN)
    model = build_model(config_from_file(path / "config.yaml"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # what make_fixtures.py stepped
    state = Checkpointer(LEGACY_RUN).load(path, model, [opt])
    exp = expected(LEGACY_RUN)
    assert state["step"] == 3 and "format" not in state
    torch.testing.assert_close(probe_logits(model, exp), torch.tensor(exp["logits"]), rtol=1e-5, atol=1e-5)
    exp_avg = opt.state[model.get_parameter(exp["exp_avg_param"])]["exp_avg"]
    assert float(exp_avg.double().sum()) == pytest.approx(exp["exp_avg_sum"], rel=1e-6, abs=1e-9)
