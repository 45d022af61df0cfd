"""Speed and memory benchmarks: `python -m benchmarks NAME [--quick] [--out DIR]`, `python -m benchmarks list`.

Every benchmark is a module of this package with a `main(argv)`; they share one harness
(`benchmarks.harness`: the machine, the result record, the argument parser) and write one record,
`<out>/<name>.json` + `<name>.md`, by default under benchmarks/results/<machine slug>/.
"""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"__init__", "__main__", "harness"}


def names() -> list[str]:
    """Every benchmark module, by name."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)


def summary(name: str) -> str:
    """What benchmark `name` measures: the first line of its docstring, read without importing it (an
    import pulls in torch and the launch modules; `list` should answer at once)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())
