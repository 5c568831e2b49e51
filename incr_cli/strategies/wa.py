"""Weight Aligning (WA): exemplars and distillation, then the new classes' weight vectors rescaled to the
old classes' mean norm."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.common.exemplar_distillation import ExemplarDistillation

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


@torch.no_grad()
def align_weights(weight: Tensor, n_old: int) -> float:
    """Scale rows n_old.. of `weight` in place by gamma = mean_i ||W_old,i|| / mean_j ||W_new,j||; returns gamma."""
    gamma = weight[:n_old].norm(dim=1).mean() / weight[n_old:].norm(dim=1).mean()
    weight[n_old:] *= gamma
    return float(gamma)


class WeightAligning(ExemplarDistillation):
    """WA (Zhao, Xiao, Gan, Zhang and Xia 2020, "Maintaining Discrimination and Fairness in Class
    Incremental Learning", CVPR 2020).

    Training: `ExemplarDistillation`, L = (1 - lambda) * CE + lambda * L_KD with lambda = n / (n + m) and
    T = 2 (the paper's, after BiC), on the task's data and the exemplars. The classifier is the paper's
    o = W^T phi(x), without bias terms: the head's biases are held at zero (set to zero when the head grows
    and after every step). Weight clipping: after every optimiser step the weights are clipped to be
    non-negative (a FACIL-based port's "--clip-head-weights"): with the backbone's features non-negative
    (ReLU) the logits then grow with the weight norms, so that the norms carry the bias towards new classes
    that aligning removes. After each task but the first, Weight Aligning corrects the layer:

        gamma = mean(||W_old,1..n||) / mean(||W_new,n+1..n+m||),    W_new <- gamma * W_new,

    with ||.|| the L2 norm of one class's weight vector. The aligned weights stay: the next task trains from
    them and distils from them. Each task's gamma is recorded in `gammas` (checkpointed).

    Why no biases: with them (PyCIL's port keeps them and aligns the weights only) the bias towards new
    classes settles in the biases on digits, the new weights come out no longer than the old (gamma 1.02 to
    1.07), and aligning made the head more biased (memory 200, seed 0: class-IL 0.91 -> 0.86 at the last
    task). Defaults: T = 2, clipping on, memory 2,000 exemplars on CIFAR-100 in the paper (200 here, as on the
    digits stream), herding selection (iCaRL's exemplar management, which the paper follows)."""

    def __init__(self, memory: Memory, temperature: float = 2.0, clip_weights: bool = True):
        super().__init__(memory, temperature)
        self.clip_weights = bool(clip_weights)
        self.gammas: list[float] = []

    def before_task(self, task: Task) -> None:
        with torch.no_grad():
            self.model.head.bias.zero_()  # the rows just grown come with PyTorch's initial biases
        super().before_task(task)

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        loss = super().training_step(batch, runner)
        with torch.no_grad():
            self.model.head.bias.zero_()  # a bias-free layer: the step's change to the biases is undone
            if self.clip_weights:
                self.model.head.weight.clamp_(min=0)
        return loss

    def after_task(self, task: Task) -> None:
        if self.old_classes:
            self.gammas.append(align_weights(self.model.head.weight, self.old_classes))
        super().after_task(task)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gammas": list(self.gammas)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gammas = [float(g) for g in state.get("gammas", [])]
