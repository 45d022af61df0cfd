"""Report on runs: `python -m launch.report RUN [RUN ...] [out=DIR] [slot_sequences=N] [title=TEXT]`.

Each RUN is a run directory, or a directory of run directories (a sweep's `out`). Writes
OUT/report.md (the table, then the plots), OUT/runs.csv and the PNGs; OUT defaults to RUN/report
for one run and PARENT/report for runs sharing a parent directory. An earlier report in OUT is
replaced; any other non-empty OUT, a run's own files or a checkpoint are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.config import load_config
from launch.config.loader import HELP_FLAGS, PRINT_FLAGS
from launch.report.write import write_report
from launch.runtime.errors import ConfigError, run_cli

USAGE = "usage: python -m launch.report RUN [RUN ...] [out=DIR] [slot_sequences=N] [title=TEXT]"


@dataclass
class ReportArgs:
    runs: list[str] = field(default_factory=list)  # run directories (also given as plain arguments)
    # the report directory (default: RUN/report, or PARENT/report for runs sharing a parent directory)
    out: str | None = None
    # memory runs: validation sequences the newest checkpoint reads for the slot-read histograms; 0: none
    slot_sequences: int = 32
    title: str | None = None  # the report's title (default: the run's name, or the number of runs)


def main(argv: list[str]) -> int:
    plain = [a for a in argv if "=" not in a and a not in HELP_FLAGS + PRINT_FLAGS]
    args = load_config([a for a in argv if a not in plain], ReportArgs, usage=USAGE)
    if args.slot_sequences < 0:
        raise ConfigError(f"slot_sequences={args.slot_sequences} is out of range: expected 0 (none) or more")
    path = write_report([*args.runs, *plain], args.out, slot_sequences=args.slot_sequences, title=args.title)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
