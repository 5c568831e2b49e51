"""Cosine-normalised scores and the training that LUCIR and PODNet share: the embedding without its last
ReLU, a herding memory mixed into every batch and a frozen copy of the previous task's network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.models.convnet import CifarCNN, ConvNet
from incr_cli.models.mlp import MLP
from incr_cli.strategies.teacher import PreviousTaskTeacher


def cosine_similarity(features: Tensor, weight: Tensor) -> Tensor:
    """<f / |f|, w_c / |w_c|> for every row f of `features` (N, D) and w_c of `weight` (C, D): (N, C), float32."""
    return F.normalize(features.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()


def embedding_distillation(features: Tensor, old_features: Tensor) -> Tensor:
    """Batch mean of 1 - cos(f(x), f*(x)) between the current and the previous network's embeddings: LUCIR's
    less-forget constraint and PODNet's POD-flat as its authors' code computes it."""
    return (1 - F.cosine_similarity(features.float(), old_features.float(), dim=1)).mean()


def final_relu(backbone: nn.Module) -> nn.ReLU | None:
    """The ReLU module that ends the backbone, where there is one (MLP, ConvNet, CifarCNN)."""
    last = None
    if isinstance(backbone, MLP):
        last = backbone.layers[-1]
    elif isinstance(backbone, (ConvNet, CifarCNN)):
        last = backbone.fc[-1]
    return last if isinstance(last, nn.ReLU) else None


def embed(backbone: nn.Module, x: Tensor, stages: Sequence[nn.Module] = ()) -> tuple[list[Tensor], Tensor]:
    """The outputs of the `stages` modules and the backbone's embedding, taken before its final ReLU where
    that is a module (forward hooks held for this call only).

    Both papers' code drops the last ReLU for the cosine classifier. On the ReLU output of the digits MLP,
    4% of the units were active and some samples' embeddings were all zero, where the cosine's gradient,
    which grows as 1 / |f|, is unstable. Final class-IL accuracy on digits (memory 50, seed 0) with the
    ReLU output against before it: PODNet with POD-spatial alone 0.79 / 0.97, LUCIR 0.96 / 0.98."""
    outputs: list[Tensor] = []
    hooks = [
        module.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        for module in stages
    ]
    relu, before_relu = final_relu(backbone), []
    if relu is not None:  # the input is cloned: the in-place ReLU overwrites it
        hooks.append(
            relu.register_forward_pre_hook(lambda module, inputs: before_relu.append(inputs[0].clone()))
        )
    try:
        features = backbone(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, before_relu[0] if before_relu else features


class EmbeddingDistillation(PreviousTaskTeacher):
    """What LUCIR and PODNet share: each training batch is joined by an equal-sized batch drawn from a memory
    of exemplars (herding selection, iCaRL's, which both papers use), filled with each task's training samples
    at its end; and from the second task on, a frozen copy of the network as it ended the previous task (eval
    mode) gives the features to distil from. Learnable scalars and classifier weights of the method are
    parameters registered on the model's head in `setup`, so the engine's optimizer trains them and the
    model's checkpoint saves them."""

    supports_distributed = True  # its state comes from whole tasks, never from one rank's slice

    def __init__(self, memory: Memory, replay_batch_size: int | None = None):
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be a positive integer or null, got {replay_batch_size}")
        self.memory = memory
        self.replay_batch_size = replay_batch_size

    def register(self, name: str, value: Tensor) -> nn.Parameter:
        """A float32 parameter of the method on the model's head, on the training device."""
        parameter = nn.Parameter(value.to(self.context.device, torch.float32))
        self.model.head.register_parameter(name, parameter)
        return parameter

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

    def with_replay(self, batch: Batch) -> Batch:
        if not len(self.memory):
            return batch
        return batch.join(self.memory.sample(self.replay_batch_size or len(batch), self.rng))

    def after_task(self, task: Task) -> None:
        x, y = self.stream.train_x[task.train_index], self.stream.train_y[task.train_index]
        self.memory.add(x, y, self.rng, features=self.features(x) if self.memory.needs_features else None)
