"""The frozen network of the previous task: what distillation methods (LwF, iCaRL, BiC, WA, LUCIR, PODNet)
learn from. One place for taking the copy, freezing it and carrying it through checkpoints."""

from __future__ import annotations

import copy

from incr_cli.data.stream import Task
from incr_cli.models.head import IncrementalNet
from incr_cli.strategies.base import Strategy


class PreviousTaskTeacher(Strategy):
    """From the second task on, `old_model` is a frozen copy (eval mode, no gradients) of the network as it
    ended the previous task, and `old_classes` the number of classes it knew: the head has already grown when
    the copy is taken, and its trained rows are unchanged, so the copy's first `old_classes` outputs are
    exactly the previous network's. Its weights go through `state_dict`, so resume is exact."""

    # Old classes are "the head minus this task's": in domain-IL, where every task has all classes, none.
    scenarios = ("class_il", "task_il")
    old_model: IncrementalNet | None = None
    old_classes: int = 0

    def before_task(self, task: Task) -> None:
        self.old_classes = self.model.head.n_classes - len(task.classes)
        self.old_model = self._frozen(self.model.state_dict()) if self.old_classes > 0 else None

    def _frozen(self, weights: dict) -> IncrementalNet:
        old = copy.deepcopy(self.model)
        old.load_state_dict(weights)
        old.eval()
        for parameter in old.parameters():
            parameter.requires_grad_(False)
        return old

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "old_classes": self.old_classes}
        if self.old_model is not None:
            state["old_model"] = {k: v.detach().clone() for k, v in self.old_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        # The engine loads the model first: its deep copy has the right structure and device.
        super().load_state_dict(state)
        self.old_classes = int(state.get("old_classes", 0))
        self.old_model = self._frozen(state["old_model"]) if "old_model" in state else None
