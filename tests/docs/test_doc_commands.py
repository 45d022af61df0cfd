"""Every command shown in README.md and docs/*.md is checked: run for real, or checked statically.

Convention (CONTRIBUTING.md, "Commands in the docs"): a fenced ```bash / ```sh / ```console block may be
preceded by one HTML comment

    <!-- doc-test: DIRECTIVE; DIRECTIVE; ... -->

with directives
    run                      run the block's `python -m launch.X` / `torchrun ... -m launch.X` commands
    skip (REASON)            run nothing (the reason is required); static checks only
    add MODULE: ARGS         append ARGS to every command of MODULE (e.g. tiny step counts)
    sub OLD => NEW           replace text in the block's commands before running them
    env KEY=VALUE            environment for the block's commands
    slow                     the page's run test is marked slow (it runs heavier commands)

A block holding a launch command must carry `run` or `skip (...)`. Every command, run or not, is checked
statically: its module exists (importlib.util.find_spec), every `a.b=c` argument names a key of the schema
the command loads (the dataclasses of launch.config and the command's args dataclass), scripts and paths it
names exist. Run commands of one page run in order in one temp directory (configs/ and tests/ linked in),
so later commands read what earlier ones wrote (a checkpoint for eval, grow, convert).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shlex
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..conftest import REPO, run_command  # noqa: TID252

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED_PAGES = [*PAGES, REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md"]
FENCE = re.compile(r"^```(\w*)\s*$")
ANNOTATION = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
SHELL_LANGS = {"bash", "sh", "console", "shell"}
# Programs the docs may show that are not Python modules of this repo: checked by name only.
EXTERNAL = {
    "ruff",
    "pip",
    "srun",
    "scontrol",
    "mount",
    "sbatch",
    "lm_eval",
    "nice",
    "git",
    "cd",
    "export",
    "ls",
    "cat",
}


# ---------------------------------------------------------------------------------------------
# Extraction


@dataclass
class Block:
    page: Path
    line: int
    commands: list[str]
    run: bool = False
    skip: str | None = None
    annotated: bool = False
    add: dict[str, list[str]] = field(default_factory=dict)
    subs: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    slow: bool = False

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse_annotation(text: str, block: Block) -> None:
    block.annotated = True
    for part in (p.strip() for p in re.split(r";(?![^()]*\))", text)):  # no split inside (...)
        if not part:
            continue
        if part == "run":
            block.run = True
        elif part == "slow":
            block.slow = True
        elif part.startswith("skip"):
            m = re.fullmatch(r"skip\s*\((.+)\)", part)
            if not m:
                raise ValueError(f"{block.where}: 'skip' needs a reason: skip (REASON)")
            block.skip = m.group(1)
        elif part.startswith("add "):
            module, _, args = part[4:].partition(":")
            block.add.setdefault(module.strip(), []).extend(shlex.split(args))
        elif part.startswith("sub "):
            old, sep, new = part[4:].partition("=>")
            if not sep:
                raise ValueError(f"{block.where}: sub needs OLD => NEW")
            block.subs.append((old.strip(), new.strip()))
        elif part.startswith("env "):
            key, _, value = part[4:].strip().partition("=")
            block.env[key] = value
        else:
            raise ValueError(f"{block.where}: unknown doc-test directive {part!r}")


def split_commands(body: str) -> list[str]:
    """Shell text -> commands: comments dropped, continuations joined, `&&` / `;` chains split."""
    logical, current = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.startswith("$ "):  # console prompt
            line = line[2:]
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    commands = []
    for line in logical:
        part: list[str] = []
        for token in shlex.split(line, comments=True) + ["&&"]:
            if token in ("&&", ";", "||"):
                if part:
                    commands.append(shlex.join(part))
                part = []
            else:
                part.append(token)
    return commands


def extract(page: Path) -> list[Block]:
    blocks, pending, in_block, lang, body, start = [], None, False, "", [], 0
    for i, line in enumerate(page.read_text().splitlines(), 1):
        m = FENCE.match(line.strip())
        if not in_block:
            a = ANNOTATION.match(line.strip())
            if a:
                pending = (a.group(1), i)
            elif m:
                in_block, lang, body, start = True, m.group(1), [], i
            elif line.strip():
                pending = None
            continue
        if line.strip() == "```":
            in_block = False
            if lang in SHELL_LANGS:
                block = Block(page, start, split_commands("\n".join(body)))
                if pending:
                    parse_annotation(pending[0], block)
                blocks.append(block)
            pending = None
            continue
        body.append(line)
    return blocks


ALL_BLOCKS = [b for page in PAGES if page.exists() for b in extract(page)]
ALL_COMMANDS = [(b, c) for b in ALL_BLOCKS for c in b.commands]


# ---------------------------------------------------------------------------------------------
# Parsing one command


@dataclass
class Command:
    env: dict[str, str]
    program: str
    module: str | None  # python -m MODULE / torchrun -m MODULE
    script: str | None  # python path/to/script.py, bash path.sh
    args: list[str]
    nproc: int = 1
    torchrun_multinode: bool = False


def parse(text: str) -> Command:
    tokens = shlex.split(text)
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    if tokens and tokens[0] == "nice":  # nice -n 19 CMD
        tokens = tokens[3:] if len(tokens) > 2 and tokens[1] == "-n" else tokens[1:]
    program = tokens[0]
    rest = tokens[1:]
    if (program.endswith("python") or program.endswith("python3")) and rest[:2] == ["-m", "launch.torchrun"]:
        program, rest = "launch.torchrun", rest[2:]  # torchrun's options, then -m MODULE (below)
    if program.endswith("python") or program.endswith("python3"):
        if rest and rest[0] == "-m":
            return Command(env, "python", rest[1], None, rest[2:])
        return Command(env, "python", None, rest[0] if rest else None, rest[1:])
    if program in ("torchrun", "launch.torchrun"):
        nproc, multinode = 1, False
        while rest and rest[0] != "-m":
            opt = rest.pop(0)
            if opt.startswith("--nproc_per_node="):
                nproc = int(opt.split("=", 1)[1])
            if opt.startswith(("--nnodes", "--node_rank", "--rdzv")):
                multinode = True
        return Command(env, program, rest[1], None, rest[2:], nproc, multinode)
    if program == "bash":
        return Command(env, "bash", None, rest[0] if rest else None, rest[1:])
    return Command(env, program, None, None, rest)


# The args dataclass each command loads (by name; looked up in the command's module so the check
# follows the code when files move).
SCHEMAS = {
    "launch.train": "Config",
    "launch.plan": "Config",
    "launch.eval": "EvalArgs",
    "launch.grow": "GrowArgs",
    "launch.sweep": "SweepArgs",
    "launch.facts": "FactsArgs",
    "launch.tokenizer": "TokenizerArgs",
    "launch.tokenize": "TokenizeArgs",
    "launch.convert to-hf": "ToHFArgs",
    "launch.convert from-hf": "FromHFArgs",
    "launch.report": "ReportArgs",
    "launch.quickstart": "QuickstartArgs",
}
EXTRA_KEYS = {  # arguments a command takes besides its schema's keys
    "launch.train": {"config", "print_config"},
    "launch.plan": {"config", "print_config", "world", "out"},
}
FLAGS = {"--help", "-h", "help", "--cfg", "--print-config"}


def find_schema(module: str, name: str) -> type:
    candidates = [module, f"{module}.__main__", "launch.config"]
    for cand in candidates:
        try:
            mod = importlib.import_module(cand)
        except ImportError:
            continue
        obj = getattr(mod, name, None)
        if dataclasses.is_dataclass(obj):
            return obj
    raise AssertionError(f"no dataclass {name} in {module} (or its __main__)")


def key_exists(schema: type, dotted: str) -> bool:
    current: typing.Any = schema
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(current):
            return False
        hints = typing.get_type_hints(current)
        names = {f.name for f in dataclasses.fields(current)}
        if part not in names:
            return False
        current = hints[part]
    return True


def override_keys(cmd: Command) -> tuple[str, list[str]]:
    """(schema name key, the `a.b=c` keys of the command)."""
    args = list(cmd.args)
    key = cmd.module or ""
    if cmd.module == "launch.convert" and args and args[0] in ("to-hf", "from-hf"):
        key = f"launch.convert {args.pop(0)}"
    if cmd.module == "launch.sweep" and args and args[0] == "collect":
        args.pop(0)
    return key, [a.split("=", 1)[0] for a in args if "=" in a and a not in FLAGS and not a.startswith("-")]


def static_check(cmd: Command) -> None:
    if cmd.module:
        assert importlib.util.find_spec(cmd.module) is not None, f"no module {cmd.module}"
        key, keys = override_keys(cmd)
        if key in SCHEMAS:
            schema = find_schema(cmd.module, SCHEMAS[key])
            extra = EXTRA_KEYS.get(key, set())
            for k in keys:
                assert k in extra or key_exists(schema, k), f"{key}: '{k}' is not a key of {schema.__name__}"
        if cmd.module == "pytest":
            for a in cmd.args:
                if a.startswith("tests/"):
                    assert (REPO / a.split("::")[0]).exists(), f"no test path {a}"
        if cmd.module == "benchmarks" and cmd.args and cmd.args[0] != "list":
            name = cmd.args[0]
            # benchmark scripts are reorganised in issue 29: accept the script anywhere under benchmarks/
            found = list((REPO / "benchmarks").rglob(f"{name}.py")) + list((REPO / "benchmarks").rglob(name))
            assert found, f"no benchmark named {name} under benchmarks/"
    elif cmd.script:
        path = REPO / cmd.script
        if not path.exists():
            # research scripts move from benchmarks/ to experiments/ (issue 29): the same file name counts
            base = Path(cmd.script).name
            moved = (
                [p for d in ("benchmarks", "experiments") for p in (REPO / d).rglob(base)]
                if (REPO / "benchmarks").exists()
                else []
            )
            assert moved, f"no script {cmd.script}"
    else:
        assert cmd.program in EXTERNAL or cmd.program.startswith((".venv", "$")), (
            f"unknown program {cmd.program}"
        )


# ---------------------------------------------------------------------------------------------
# Tests


def test_readme_is_a_short_front_door():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines (at most 200: details belong in docs/)"


def test_commands_were_found():
    assert len(ALL_COMMANDS) > 20
    assert any(b.run for b in ALL_BLOCKS)


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.where)
def test_blocks_with_launch_commands_are_annotated(block):
    has_launch = any(" -m launch." in f" {c}" for c in block.commands)
    if has_launch:
        assert block.run or block.skip, (
            f"{block.where}: a block with launch commands needs <!-- doc-test: run --> or skip (REASON)"
        )


@pytest.mark.parametrize("block_cmd", ALL_COMMANDS, ids=lambda bc: f"{bc[0].where}:{bc[1][:60]}")
def test_command_static(block_cmd):
    block, text = block_cmd
    if re.match(r"'?[A-Za-z_]\w*=\$\(", text):  # a shell variable set from a command substitution
        return
    static_check(parse(text))


def runnable(block: Block, text: str) -> list[str] | None:
    for old, new in block.subs:
        text = text.replace(old, new)
    cmd = parse(text)
    if not (cmd.module and cmd.module.startswith("launch.")) or cmd.torchrun_multinode:
        return None
    args = [*cmd.args, *block.add.get(cmd.module, [])]
    if cmd.program in ("torchrun", "launch.torchrun") and cmd.nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run" if cmd.program == "torchrun" else "launch.torchrun",
            "--standalone",
            f"--nproc_per_node={cmd.nproc}",
            "-m",
            cmd.module,
            *args,
        ]
    return [sys.executable, "-m", cmd.module, *args]


RUN_PAGES = sorted({b.page for b in ALL_BLOCKS if b.run})


def _page_param(page: Path):
    slow = any(b.slow for b in ALL_BLOCKS if b.page == page and b.run)
    return pytest.param(page, id=str(page.relative_to(REPO)), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("page", [_page_param(p) for p in RUN_PAGES])
def test_page_commands_run(page, tmp_path):
    """The page's `run` blocks, in order, in one temp directory (configs/ and tests/ linked in)."""
    for name in ("configs", "tests", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # fmt: skip
    ran = 0
    for block in (b for b in ALL_BLOCKS if b.page == page and b.run):
        for text in block.commands:
            cmd = runnable(block, text)
            if cmd is None:
                continue
            env = {**base_env, **parse(text).env, **block.env}
            if "torch.distributed.run" in cmd or "launch.torchrun" in cmd:
                env["OMP_NUM_THREADS"] = "1"
            proc = run_command(cmd, cwd=tmp_path, env=env, timeout=300)
            assert proc.returncode == 0, (
                f"{block.where}: {text}\nran: {' '.join(cmd[1:])}\nexit {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
            ran += 1
    assert ran, f"{page.name}: run blocks but no launch command"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_resolve():
    """Every relative link in README, docs/, CONTRIBUTING and CHANGELOG names an existing file or folder.
    (Links into benchmarks/results/<machine>/ and experiments/results/ resolve once the issue-29 moves land.)"""
    missing = []
    for page in LINKED_PAGES:
        if not page.exists():
            continue
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert not missing, "broken links:\n" + "\n".join(missing)
