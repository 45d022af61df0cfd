"""What every command relies on at run time: one-line user errors (`errors`), the run directory's lock and
guards (`run_dir`), safe output paths (`outputs`) and fault injection for the failure tests (`faults`)."""
