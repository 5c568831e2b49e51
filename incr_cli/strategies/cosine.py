"""Cosine-normalised scores and the training that LUCIR and PODNet share: the embedding without its last
ReLU, a herding memory joined to each task's training set, a frozen copy of the previous task's network,
frozen old classifier rows and an optional class-balanced finetuning stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.backbone import Backbone, require
from incr_cli.strategies.base import Context
from incr_cli.strategies.common.teacher import PreviousTaskTeacher

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


def cosine_similarity(features: Tensor, weight: Tensor) -> Tensor:
    """<f / |f|, w_c / |w_c|> for every row f of `features` (N, D) and w_c of `weight` (C, D): (N, C), float32."""
    return F.normalize(features.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


def embedding_distillation(features: Tensor, old_features: Tensor) -> Tensor:
    """Batch mean of 1 - cos(f(x), f*(x)) between the current and the previous network's embeddings: LUCIR's
    less-forget constraint and PODNet's POD-flat as its authors' code computes it."""
    return (1 - F.cosine_similarity(features.float(), old_features.float(), dim=1)).mean()


def embed(backbone: Backbone, x: Tensor, stages: Sequence[nn.Module] = ()) -> tuple[list[Tensor], Tensor]:
    """The outputs of the `stages` modules (forward hooks held for this call only) and the backbone's
    embedding before its last activation, which both papers' cosine classifiers take."""
    outputs: list[Tensor] = []
    hooks = [
        module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        for module in stages
    ]
    try:
        features = backbone.embedding_before_activation(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, features


EXEMPLARS = ("training_set", "joined_batch")
FINETUNE_PARAMS = ("classifier", "network")
FINETUNE_SCHEDULES = ("constant", "cosine", "step")


class EmbeddingDistillation(PreviousTaskTeacher):
    """What LUCIR and PODNet share: a memory of exemplars (herding selection, iCaRL's, which both papers use),
    filled with each task's training samples at its end; from the second task on, a frozen copy of the
    network as it ended the previous task (eval mode) gives the features to distil from. Learnable scalars
    and classifier rows of the method are parameters registered on the model's head in `setup`, so the
    engine's optimizer trains them and the model's checkpoint saves them.

    - `exemplars`: `training_set` (both authors' code, PyCIL, Mammoth): the exemplars join the task's
      training set, each seen once per epoch among the new data (the memory keeps each one's row in the
      stream); `joined_batch`: every batch of new data is joined by `replay_batch_size` (default: as many)
      exemplars drawn from the memory, which gives the old classes half of every batch.
    - `freeze_old` (both authors' code, PyCIL, Mammoth: the old classes' rows train at learning rate 0):
      from the second task on, the rows of the classes seen before stay as the previous task left them;
      they are put back after every optimizer step, which for SGD or Adam (element-wise updates) is the
      same as a learning rate and weight decay of 0 on them.
    - Class-balanced finetuning (`finetune_epochs` > 0), from the second task on, once the memory holds the
      task's exemplars (as many per class, old and new): `finetune_epochs` epochs over the memory alone, with
      the method's loss, a fresh optimizer of the run's kind (its momentum and weight decay) at
      `finetune_lr`, kept constant, annealed by a cosine, or divided by 10 at each of
      `finetune_milestones` (`finetune_schedule`). `finetune_params: classifier` trains the classifier's rows,
      old and new, and nothing else (both authors' code); `network` trains every parameter but the old rows
      (PyCIL's PODNet). The stage steps through the step runner (`Strategy.run_stage`), with the run's
      precision and non-finite policy."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice
    # BatchNorm during class-balanced finetuning: LUCIR's code keeps the running statistics (eval mode)
    finetune_freezes_batchnorm = False
    # what the method takes from its backbone (`Backbone`'s members), checked before training
    backbone_needs: tuple[str, ...] = ("embedding_before_activation",)

    def __init__(
        self,
        memory: Memory,
        exemplars: str = "training_set",
        replay_batch_size: int | None = None,
        freeze_old: bool = True,
        finetune_epochs: int = 0,
        finetune_lr: float = 0.01,
        finetune_params: str = "classifier",
        finetune_schedule: str = "constant",
        finetune_milestones: Sequence[int] = (),
    ):
        if exemplars not in EXEMPLARS:
            raise ValueError(f"exemplars must be one of {', '.join(EXEMPLARS)}, got {exemplars!r}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be a positive integer or null, got {replay_batch_size}")
        if finetune_epochs < 0 or finetune_lr <= 0:
            raise ValueError(
                f"finetune_epochs must be >= 0 and finetune_lr > 0, got {finetune_epochs=}, {finetune_lr=}"
            )
        if finetune_params not in FINETUNE_PARAMS:
            raise ValueError(
                f"finetune_params must be one of {', '.join(FINETUNE_PARAMS)}, got {finetune_params!r}"
            )
        if finetune_schedule not in FINETUNE_SCHEDULES:
            raise ValueError(
                f"finetune_schedule must be one of {', '.join(FINETUNE_SCHEDULES)}, got {finetune_schedule!r}"
            )
        self.memory, self.exemplars = memory, exemplars
        self.replay_batch_size = replay_batch_size
        self.freeze_old = bool(freeze_old)
        self.finetune_epochs, self.finetune_lr = int(finetune_epochs), float(finetune_lr)
        self.finetune_params, self.finetune_schedule = finetune_params, finetune_schedule
        self.finetune_milestones = [int(m) for m in finetune_milestones]

    def setup(self, context: Context) -> None:
        super().setup(context)
        require(self.model.backbone, type(self).__name__, self.backbone_needs)

    def register(self, name: str, value: Tensor) -> nn.Parameter:
        """A float32 parameter of the method on the model's head, on the training device."""
        parameter = nn.Parameter(value.to(self.context.device, torch.float32))
        self.model.head.register_parameter(name, parameter)
        return parameter

    def classifier_rows(self, model: nn.Module) -> tuple[nn.Parameter, int]:
        """The parameter of `model` whose rows score the classes, and its rows per class."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Embeddings (before the final ReLU) of raw uint8 images, eval mode: for herding and imprinting."""
        was_training = self.model.training
        self.model.eval()
        chunks = [
            embed(self.model.backbone, self.context.preprocess(x[i : i + batch_size]))[1]
            for i in range(0, len(x), batch_size)
        ]
        self.model.train(was_training)
        return torch.cat(chunks).float()

    def training_indices(self, task: Task) -> Tensor:
        if self.exemplars == "joined_batch":
            return task.train_index
        return self.rows_with_memory(task.train_index)

    def with_replay(self, batch: Batch) -> Batch:
        return super().with_replay(batch) if self.exemplars == "joined_batch" else batch

    def loss(self, batch: Batch) -> Tensor:
        """The method's loss on a batch (exemplars already in it)."""
        raise NotImplementedError

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        self.step_runner = runner  # its precision and non-finite policy also run the finetuning stage
        with runner.autocast():
            loss = self.loss(self.with_replay(batch))
        if runner.backward(loss):
            runner.step()
            self.after_step(freeze_old=self.freeze_old)
        return loss.detach()

    @torch.no_grad()
    def after_step(self, freeze_old: bool) -> None:
        """After each optimizer step: put the old classes' rows back (`freeze_old`)."""
        if not freeze_old or self.old_model is None:
            return
        rows, per_class = self.classifier_rows(self.model)
        n = self.old_classes * per_class
        rows[:n] = self.classifier_rows(self.old_model)[0][:n]

    def after_task(self, task: Task) -> None:
        self.remember_rows(task.train_index, row_extra="index")
        if self.finetune_epochs and self.old_model is not None and len(self.memory):
            self.balanced_finetuning()

    def balanced_finetuning(self) -> None:
        """Train on the class-balanced memory alone (the class docstring's finetuning stage)."""
        classifier = self.classifier_rows(self.model)[0]
        everything = self.finetune_params == "network"
        optimizer = self.context.make_optimizer(self.model.parameters() if everything else [classifier])
        for group in optimizer.param_groups:
            group["lr"] = self.finetune_lr
        if self.finetune_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.finetune_epochs)
        elif self.finetune_schedule == "step":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.finetune_milestones, gamma=0.1)
        else:
            scheduler = None
        was_training = self.model.training
        self.model.train()
        if self.finetune_freezes_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        self.run_stage(
            self.memory,
            self.loss,
            optimizer,
            self.finetune_epochs,
            scheduler=scheduler,
            after_step=lambda: self.after_step(freeze_old=everything and self.freeze_old),
            name="class-balanced finetuning",
        )
        # the stage's optimizer clears only its own parameters' gradients: the frozen ones' go too
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)
