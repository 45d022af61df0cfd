"""`python -m benchmarks NAME [--quick] [--out DIR] [its own options]` runs one benchmark;
`python -m benchmarks list` names them all with what each measures."""

from __future__ import annotations

import importlib
import sys

from benchmarks import names, summary

USAGE = "usage: python -m benchmarks {list | NAME [--quick] [--out DIR] [options]} (NAME --help: its options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "list":
        width = max(map(len, names()))
        for n in names():
            print(f"{n:<{width}}  {summary(n)}")
        return 0
    if name not in names():
        print(
            f"python -m benchmarks: unknown benchmark {name!r}; one of: {', '.join(names())}", file=sys.stderr
        )
        return 2
    importlib.import_module(f"benchmarks.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
