"""The strategy contract: what a continual-learning method may change about training, and nothing more.

The engine owns the loop, the optimizer step, mixed precision and checkpoints. A method overrides the hooks
it needs, in the order they run: `before_task`, `training_indices`, per batch `loss` (or `training_step`
for methods that change the update itself, such as GEM or MER), `after_task`, and `predict` for methods
that classify differently. Everything it remembers between tasks goes through `state_dict`, so resume is
exact: tensors, numbers, strings, lists and dicts only (checkpoints load with `weights_only=True`).
What many methods do alike (draw a replay batch, offer samples to the memory, join the memory's rows to a
task's, train a second stage of the method's own through the step runner) are helpers on `Strategy`, below
the hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch, Preprocess
from incr_cli.data.stream import Stream, Task
from incr_cli.data.streamed import StreamedImages, StreamedRows
from incr_cli.memory import Memory
from incr_cli.models.head import IncrementalNet
from incr_cli.step import Hardware, StepRunner


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
    # builds a step runner of the run's precision and non-finite policy around an optimizer, for training
    # stages of a method's own (`Strategy.run_stage`); None: they copy the runner of the task's steps
    make_step_runner: Callable[[torch.optim.Optimizer, Callable[[], str]], StepRunner] | None = None


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

    # The runner of the task's steps, kept by `training_step` for the stages of the method's own (an override
    # of `training_step` that wants `run_stage` to copy it keeps it too).
    step_runner: StepRunner | None = None

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        """One update from one batch. Methods that change the update (projected or meta-learned gradients)
        override this; `runner` does the scaled backward, the non-finite check and the step."""
        self.step_runner = runner
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
        images = self.stream.train_x
        if isinstance(images, StreamedImages):  # read only what the memory keeps (and scores in batches)
            self.remember_samples(StreamedRows(images, rows), self.stream.train_y[rows], **extras)
        else:
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

    def stage_runner(self, optimizer: torch.optim.Optimizer, where: Callable[[], str]) -> StepRunner:
        """A step runner around `optimizer` for a training stage of the method's own, with the run's precision
        (a fresh loss scaler) and non-finite policy: from the engine (`Context.make_step_runner`), else a
        copy of the runner of the task's steps; a run resumed right after its task's last step has neither
        and steps in full precision, stopping on a non-finite loss."""
        if self.context.make_step_runner is not None:
            return self.context.make_step_runner(optimizer, where)
        runner = self.step_runner
        if runner is None:
            hardware = Hardware(self.context.device, None)
            return StepRunner(optimizer, hardware.grad_scaler(), hardware, "stop", where)
        hardware = runner.hardware
        return StepRunner(optimizer, hardware.grad_scaler(), hardware, runner.on_nonfinite, where)

    def run_stage(
        self,
        samples: Tensor | Memory,
        loss: Callable[[Batch], Tensor],
        optimizer: torch.optim.Optimizer,
        epochs: int,
        *,
        batch_size: int | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        after_step: Callable[[], None] | None = None,
        name: str = "stage",
    ) -> None:
        """A training stage of the method's own (DER's classifier re-learning, FOSTER's compression, GDumb's
        training on its memory, LUCIR's balanced finetuning), through the step runner (`stage_runner`), so that
        mixed precision and the non-finite guard hold there as in the task's steps.

        `samples`: the stream's training rows (a tensor of row indices) or a memory's samples. `epochs` passes
        over them, each in a fresh order drawn from the run's generator, cut into batches of `batch_size`
        (None: the run's); per batch, `loss(batch)` on the raw samples (the loss applies the transform), under
        autocast, its scaled backward, `optimizer`'s step and then `after_step()` (skipped with a batch that
        the non-finite policy skips); `scheduler` steps after every epoch. `name` says where a non-finite loss
        struck ("task 2, compression"). The model's and the optimizer's gradients are cleared before and
        after: a loss may reach parameters that the optimizer does not step, whose gradients would otherwise
        reach the next task's first step."""
        batch_size = batch_size or self.context.batch_size
        position = {"epoch": 0, "step": 0}
        runner = self.stage_runner(
            optimizer, lambda: f"{name} epoch {position['epoch'] + 1}, step {position['step'] + 1}"
        )
        n_samples = len(samples)
        self.model.zero_grad(set_to_none=True)
        runner.zero_grad()
        for epoch in range(epochs):
            position["epoch"] = epoch
            order = torch.randperm(n_samples, generator=self.rng, device=self.rng.device)
            for step, first in enumerate(range(0, n_samples, batch_size)):
                position["step"] = step
                if isinstance(samples, Memory):
                    batch = samples.batch(order[first : first + batch_size].to(samples.y.device))
                else:
                    rows = samples[order[first : first + batch_size].to(samples.device)]
                    batch = Batch(self.stream.train_x[rows], self.stream.train_y[rows])
                with runner.autocast():
                    batch_loss = loss(batch)
                if runner.backward(batch_loss):
                    runner.step()
                    if after_step is not None:
                        after_step()
            if scheduler is not None:
                scheduler.step()
        self.model.zero_grad(set_to_none=True)
        runner.zero_grad()

    def state_dict(self) -> dict:
        return {} if self.memory is None else {"memory": self.memory.state_dict()}

    def restore_structure(self, state: dict) -> None:
        """Called on resume with the saved `state_dict`, before the model's weights load: a method that
        grows the network (DER, FOSTER) rebuilds the saved shape here so that the weights fit."""

    def load_state_dict(self, state: dict) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
