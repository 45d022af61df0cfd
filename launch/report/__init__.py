"""`python -m launch.report RUN [RUN ...] [out=DIR]`: a report of any set of runs (report.md, runs.csv,
PNGs). Library: `write_report(runs, out) -> Path` (report.md) and `report_rows(runs)` (the table);
the plots (`launch.report.plots`) also draw `launch.sweep collect`'s figures."""

from launch.report.write import report_rows, write_report

__all__ = ["report_rows", "write_report"]
