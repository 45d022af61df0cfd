"""Our checkpoints in the tools users already have: lm-eval's own `hf` model on an export and our
`memscale` adapter on the checkpoint give the same per-request log-likelihoods on lm-eval's
built-in task definitions (fed local JSON); exports load with equal logits and tokenizer ids under
the newest transformers installed here and, in the second environment `.venv-hf4` that
`scripts/setup.sh dev` builds, the oldest one pyproject allows. Tiny random models, all offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter needs the [eval] extra")

import launch.eval.harness  # noqa: E402,F401  (registers "memscale")
from launch.config import load_config  # noqa: E402
from launch.convert.export import export_checkpoint  # noqa: E402
from launch.convert.import_hf import write_checkpoint_dir  # noqa: E402
from launch.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from launch.models.build import build_model  # noqa: E402
from tests.conftest import REPO, TINY  # noqa: E402
from tests.launch.test_convert import randomise_query_norms  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "eval"
MEMORY_YAML = str(REPO / "configs" / "memory" / "tiny_memory.yaml")
OLD_VENV = REPO / ".venv-hf4"  # built by `scripts/setup.sh dev` with the oldest supported transformers
TASKS = ["piqa", "arc_easy", "hellaswag", "boolq", "winogrande"]  # lm-eval built-ins
TEXTS = [
    "ROMEO.\nBut soft, what light",
    " a leading space",
    "Q: who wrote it?\nA: William  Shakespeare",
    "héllo ☃",
]
NATS = 1e-4


def _corpus() -> list[str]:
    rows = [json.loads(line) for t in TASKS for line in (FIXTURES / f"{t}.jsonl").read_text().splitlines()]
    return [json.dumps(r) for r in rows] * 8 + TEXTS * 8


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    return train_tokenizer(_corpus(), tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=600)


def _model(argv: list[str], sp: Path, seed: int = 0):
    cfg = load_config([*argv, f"model.vocab_size={Tokenizer(sp).vocab_size}"])
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # peaked logits, so equal log-likelihoods are not equal by near-uniformity
        model.tok_embeddings.weight.mul_(4.0)
    return model.eval(), cfg


def _grown(sp: Path):
    from tests.launch.test_convert import grow_with_trained_adapters

    return grow_with_trained_adapters(*_model([f"config={TINY}"], sp, seed=1), adapter_rank=2)


@pytest.fixture(scope="module")
def exports(sp_path, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{kind: (our checkpoint dir, its HF export)} for a dense, a grown and a memory model."""
    root = tmp_path_factory.mktemp("exports")
    models = {
        # rope_theta != 10000: transformers 4.x reading only 5.x's rope_parameters would use 10000
        "dense": _model([f"config={TINY}", "model.rope_theta=500000"], sp_path),
        "grown": _grown(sp_path),
        # query batchnorm: its running estimates must travel too (and be used in eval mode)
        "memory": _model(
            [f"config={MEMORY_YAML}", "memory.layers=[0,1]", "memory.query_batchnorm=true"], sp_path, seed=2
        ),
    }
    assert randomise_query_norms(models["memory"][0]) == 2
    out = {}
    for kind, (model, cfg) in models.items():
        ckpt = root / kind
        write_checkpoint_dir(model, cfg, sp_path, ckpt, overwrite=False, source="test")
        out[kind] = (ckpt, export_checkpoint(ckpt, root / f"{kind}_hf"))
    return out


# ---------------------------------------------------------------------------------------------
# The export's files


def test_export_declares_the_bos_convention_and_4x_fields(exports, sp_path):
    _, hf_dir = exports["dense"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rope_theta"] == 500000  # top level, which 4.x reads
    assert config.get("rope_parameters", {"rope_theta": 500000})["rope_theta"] == 500000  # 5.x's field
    assert config["torch_dtype"] == config["dtype"] == "float32"
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["add_bos_token"] is True
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ours = Tokenizer(sp_path)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == ours.encode_prompt(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


# ---------------------------------------------------------------------------------------------
# lm-eval: `hf` on the export == `memscale` on the checkpoint


def _local_task_dir(root: Path) -> Path:
    """Each built-in task's own YAML, included as is, with only the dataset switched to local JSON."""
    import lm_eval.tasks as tasks_pkg

    builtin = Path(tasks_pkg.__file__).parent
    yamls = {
        "piqa": "piqa/piqa.yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "boolq": "super_glue/boolq/default.yaml",
        "winogrande": "winogrande/default.yaml",
    }
    root.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        rows = [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines()]
        if task == "boolq":  # our fixture has the google/boolq schema; super_glue's is label 0/1
            rows = [{**r, "label": int(r.pop("answer"))} for r in rows]
        data = root / f"{task}.json"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"local_{task}.yaml").write_text(
            f"include: {builtin / yamls[task]}\n"
            f"task: local_{task}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
            "training_split: null\n"
            "test_split: null\n"
            "validation_split: validation\n"
        )
    return root


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(_local_task_dir(tmp_path_factory.mktemp("tasks"))))


def _per_request(model: str, model_args: str, task_manager) -> dict[tuple, float]:
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[f"local_{t}" for t in TASKS],
        task_manager=task_manager,
        batch_size=8,
        device="cpu",
        log_samples=True,
    )
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for k, (resp, args) in enumerate(zip(s["resps"], s["arguments"])):
                out[(task, s["doc_id"], k, *args)] = resp[0][0]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "grown", "memory"])
def test_lm_eval_hf_on_export_equals_memscale_on_checkpoint(exports, kind, task_manager):
    ckpt, hf_dir = exports[kind]
    ours = _per_request("memscale", f"checkpoint={ckpt}", task_manager)
    remote = ",trust_remote_code=True" if kind == "memory" else ""
    theirs = _per_request("hf", f"pretrained={hf_dir},dtype=float32{remote}", task_manager)
    assert ours.keys() == theirs.keys() and len(ours) >= 30
    worst = max(abs(ours[k] - theirs[k]) for k in ours)
    print(f"{kind}: {len(ours)} requests, max |ll difference| {worst:.2e} nats")
    assert worst <= NATS, f"{kind}: max per-request log-likelihood difference {worst:.3g} nats"
    spread = max(ours.values()) - min(ours.values())
    assert spread > 1.0  # the requests really differ: equal numbers are not a constant


def test_importing_the_adapter_keeps_lm_eval_builtin_models():
    from lm_eval.api.registry import get_model

    assert get_model("memscale").__name__ == "MemscaleLM"
    assert get_model("hf").__name__ == "HFLM"


def test_harness_cli_lists_hf_and_memscale(tmp_path):
    code = "import launch.evaluation.harness\nfrom lm_eval.api.registry import get_model\nprint(get_model('hf').__name__)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "HFLM", proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The oldest supported transformers, in its own environment

_CHECK_OLD = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.loads(sys.argv[1])
out = {"version": transformers.__version__}
for kind, d in spec["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=kind == "memory", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor(spec["tokens"])).logits
    tok = AutoTokenizer.from_pretrained(d)
    out[kind] = {
        "logits": logits.tolist(),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "ids": [tok(t)["input_ids"] for t in spec["texts"]],
        "bare": [tok(t, add_special_tokens=False)["input_ids"] for t in spec["texts"]],
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_exports_load_with_equal_logits_under_the_oldest_transformers(exports, sp_path):
    python = OLD_VENV / "bin" / "python"
    if not python.exists():
        if os.environ.get("MEMSCALE_REQUIRE_HF4"):  # set by .ci/run
            pytest.fail(f"{OLD_VENV} is missing: `bash scripts/setup.sh dev` builds it")
        pytest.skip(f"{OLD_VENV} is missing: `bash scripts/setup.sh dev` builds it (CI does)")
    tokens = torch.randint(
        4, Tokenizer(sp_path).vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    spec = {"dirs": {k: str(hf) for k, (_, hf) in exports.items()}, "tokens": tokens.tolist(), "texts": TEXTS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from this repo or venv
    proc = subprocess.run(
        [str(python), "-c", _CHECK_OLD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4."), got["version"]
    ours = Tokenizer(sp_path)
    from launch.checkpoint.load import load_checkpoint

    for kind, (ckpt, _) in exports.items():
        model = load_checkpoint(ckpt).model
        with torch.no_grad():
            expected = model(tokens)
        diff = (torch.tensor(got[kind]["logits"]) - expected).abs().max().item()
        assert diff <= NATS, f"{kind} under transformers {got['version']}: max |logit diff| {diff:.3g}"
        assert got[kind]["rope_theta"] == model.cfg.rope_theta
        assert got[kind]["ids"] == [ours.encode_prompt(t) for t in TEXTS]
        assert got[kind]["bare"] == [ours.encode(t) for t in TEXTS]


def test_the_second_environment_pins_the_floor_pyproject_declares():
    """scripts/setup.sh's old transformers and pyproject's lower bound must move together."""
    import re
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["hf"]
    floor = re.search(r"transformers>=([\d.]+)", " ".join(extra)).group(1)
    pinned = re.search(
        r'OLDEST_TRANSFORMERS="transformers==([\d.]+)"', (REPO / "scripts" / "setup.sh").read_text()
    ).group(1)
    assert pinned.split(".")[:2] == floor.split(".")[:2], (floor, pinned)
    assert "accelerate" not in " ".join(extra)  # never imported by this repo


def test_requests_longer_than_the_context_are_treated_as_hf_treats_them(exports):
    """A context that does not fit is cut from the left by both (same log-likelihood); a
    continuation longer than the window is refused by both instead of being scored in part."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from launch.eval.harness import MemscaleLM

    ckpt, hf_dir = exports["dense"]
    ours = MemscaleLM(checkpoint=str(ckpt), device="cpu", batch_size=4)
    theirs = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4)
    assert ours.max_length == theirs.max_length == 64

    def requests(*pairs):
        return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    long_context = "ROMEO.\nBut soft, what light through yonder window breaks? " * 12
    fits = requests((long_context, " It is the east"), ("Q: who wrote it?\nA:", " William  Shakespeare"))
    with pytest.warns(UserWarning, match="context tokens are dropped"):
        got = ours.loglikelihood(fits, disable_tqdm=True)
    want = theirs.loglikelihood(fits, disable_tqdm=True)
    assert all(abs(a[0] - b[0]) <= NATS and a[1] == b[1] for a, b in zip(got, want)), (got, want)
    too_long = requests(("ROMEO.", " " + "héllo ☃ a leading space " * 30))
    with pytest.raises(AssertionError):
        theirs.loglikelihood(too_long, disable_tqdm=True)
    with pytest.raises(ValueError, match="longer than the model's context window"):
        ours.loglikelihood(too_long, disable_tqdm=True)
