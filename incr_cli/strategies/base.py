"""The strategy contract: what a continual-learning method may change about training, and nothing more.

The engine owns the loop, the optimizer step, mixed precision and checkpoints. A method overrides the hooks
it needs, in the order they run: `before_task`, `training_indices`, per batch `loss` (or `training_step`
for methods that change the update itself, such as GEM or MER), `after_task`, and `predict` for methods
that classify differently. Everything it remembers between tasks goes through `state_dict`, so resume is
exact: tensors, numbers, strings, lists and dicts only (checkpoints load with `weights_only=True`).
What many methods do alike (draw a replay batch, offer samples to the memory, join the memory's rows to a
task's) are helpers on `Strategy`, below the hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch, Preprocess
from incr_cli.data.stream import Stream, Task
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


@dataclass
class Context:
    """What the engine hands a strategy once, before the first task."""

    model: IncrementalNet
    stream: Stream
    preprocess: Preprocess
    rng: torch.Generator  # on the training device; its state is checkpointed
    device: torch.device
    # builds the run's optimizer (its config group) over the given parameters
    make_optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    batch_size: int
    epochs: int
    seed: int
    scenario: str = "class_il"  # class_il | task_il | domain_il (incr_cli/data/stream.py)


class Strategy:
    """Fine-tuning: cross-entropy on the current task's batches over the classes seen so far."""

    # The scenarios a method is meant for; methods that find their old classes as "the head minus this
    # task's classes" (distillation, growing heads) have none of those in domain-IL, where every task has
    # all classes, and leave it out.
    scenarios: tuple[str, ...] = ("class_il", "task_il", "domain_il")
    # train.online=true (one pass, no task-end access to the whole task): methods that learn and fill their
    # memory batch by batch
    supports_online: bool = False
    # hardware=ddp: True once a method is known to keep its state identical on every rank while each rank
    # sees only its slice of a batch (no state updated from the slice, no extra backward passes)
    supports_distributed: bool = False

    def setup(self, context: Context) -> None:
        self.context = context
        self.model, self.stream, self.rng = context.model, context.stream, context.rng

    def before_task(self, task: Task) -> None:
        """Called after the head has grown to this task's classes, before the optimizer is built."""

    def training_indices(self, task: Task) -> Tensor:
        """Rows of the stream's training tensors that this task's epochs iterate over."""
        return task.train_index

    def logits(self, batch: Batch) -> Tensor:
        scores = self.model(self.context.preprocess(batch.x, self.rng))
        if self.context.scenario == "task_il":
            scores = self.own_task_scores(scores, batch.y)
        return scores

    def own_task_scores(self, scores: Tensor, labels: Tensor) -> Tensor:
        """Task-IL: each sample's scores outside its own task's classes are -inf, so the cross-entropy
        trains one head per task (the task label is known at training and test time)."""
        tasks = self.stream.tasks
        first = torch.tensor([t.classes[0] for t in tasks], device=labels.device)
        last = torch.tensor([t.classes[-1] for t in tasks], device=labels.device)
        task = self.stream.task_ids(labels)
        classes = torch.arange(scores.shape[1], device=scores.device)
        own = (classes >= first[task, None]) & (classes <= last[task, None])
        return scores.masked_fill(~own, float("-inf"))

    def loss(self, batch: Batch) -> Tensor:
        return F.cross_entropy(self.logits(batch), batch.y)

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        """One update from one batch. Methods that change the update (projected or meta-learned gradients)
        override this; `runner` does the scaled backward, the non-finite check and the step."""
        with runner.autocast():
            loss = self.loss(batch)
        if runner.backward(loss):
            runner.step()
        return loss.detach()

    def after_task(self, task: Task) -> None:
        """Called after the task's last epoch, before evaluation."""

    @torch.no_grad()
    def features(self, x: Tensor, batch_size: int = 1000) -> Tensor:
        """Backbone features of raw uint8 images (evaluation transform, eval mode), e.g. for herding."""
        was_training = self.model.training
        self.model.eval()
        chunks = [
            self.model.backbone(self.context.preprocess(x[i : i + batch_size]))
            for i in range(0, len(x), batch_size)
        ]
        self.model.train(was_training)
        return torch.cat(chunks).float()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Scores for every class of the stream (future classes included) of preprocessed inputs."""
        return self.model.forward_all(x)

    # A method with a replay memory sets `self.memory`; its size and its contents are then reported and
    # checkpointed here. Methods with more state extend state_dict / load_state_dict and call these.
    memory: Memory | None = None

    @property
    def memory_samples(self) -> int:
        return 0 if self.memory is None else len(self.memory)

    @property
    def memory_bytes(self) -> int:
        return 0 if self.memory is None else self.memory.nbytes

    # Methods that replay draw this many memory samples per training batch; None: as many as the batch holds.
    replay_batch_size: int | None = None

    def replay_size(self, batch: Batch) -> int:
        """Memory samples drawn to replay with `batch`."""
        return self.replay_batch_size or len(batch)

    def with_replay(self, batch: Batch) -> Batch:
        """`batch` followed by `replay_size(batch)` samples drawn from the memory (none while it is empty)."""
        if not len(self.memory):
            return batch
        return batch.join(self.memory.sample(self.replay_size(batch), self.rng))

    def training_samples(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Raw inputs and labels of the stream's training rows `rows`."""
        return self.stream.train_x[rows], self.stream.train_y[rows]

    def remember_samples(self, x: Tensor, y: Tensor, **extras: Tensor) -> None:
        """Offer raw samples to the memory with their extras; herding selection also gets their features."""
        if self.memory.size == 0 or len(y) == 0:
            return  # nothing is kept: no features to compute
        features = self.features(x) if self.memory.needs_features else None
        self.memory.add(x, y, self.rng, features=features, **extras)

    def remember_rows(self, rows: Tensor, row_extra: str | None = None) -> None:
        """Offer the stream's training rows `rows` to the memory; with `row_extra`, each sample keeps its row
        as that extra, so that later tasks can train on it (`rows_with_memory`)."""
        extras = {} if row_extra is None else {row_extra: rows}
        self.remember_samples(*self.training_samples(rows), **extras)

    def memory_rows(self, row_extra: str = "index") -> Tensor:
        """The stream's training rows of the memory's samples, kept as their extra `row_extra`."""
        if not len(self.memory):
            return torch.zeros(0, dtype=torch.long, device=self.context.device)
        return self.memory.extras[row_extra]

    def rows_with_memory(self, rows: Tensor, row_extra: str = "index") -> Tensor:
        """`rows` of the stream's training tensors followed by the memory's: exemplars join the task's
        training set, each once per epoch, rather than each batch (iCaRL, BiC, WA, LUCIR, PODNet, DER, FOSTER)."""
        if not len(self.memory):
            return rows
        return torch.cat([rows, self.memory_rows(row_extra).to(rows.device)])

    def state_dict(self) -> dict:
        return {} if self.memory is None else {"memory": self.memory.state_dict()}

    def restore_structure(self, state: dict) -> None:
        """Called on resume with the saved `state_dict`, before the model's weights load: a method that
        grows the network (DER, FOSTER) rebuilds the saved shape here so that the weights fit."""

    def load_state_dict(self, state: dict) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
