"""Named points in the training step where optional components attach (today: fault injection for
the failure tests, `launch.runtime.faults`). The trainer calls the points; with no hooks installed
each call is an empty loop."""

from __future__ import annotations

from typing import Any


class StepHooks:
    """Dispatches the trainer's hook points to every installed hook that defines them:

    before_step(step)         at the start of optimizer step `step`
    after_loss(loss, step)    on the step's reduced loss; returns the loss the step goes on with
    """

    def __init__(self, hooks: list[Any]):
        self.hooks = list(hooks)

    def before_step(self, step: int) -> None:
        for hook in self.hooks:
            if hasattr(hook, "before_step"):
                hook.before_step(step)

    def after_loss(self, loss, step: int):
        for hook in self.hooks:
            if hasattr(hook, "after_loss"):
                loss = hook.after_loss(loss, step)
        return loss
