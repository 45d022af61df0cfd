"""Training behind `python -m launch.train`: the loop (`trainer`), parameter groups, optimizers and the
LR schedule (`optim`), the loss (`loss`), validation (`validation`) and what a run reports (`metrics`)."""
