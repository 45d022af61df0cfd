"""Config-driven ablations behind `python -m launch.sweep`: sweep files (`spec`), running them (`runner`),
results tables (`collect`, `summary`) and their plots (`plots`)."""
