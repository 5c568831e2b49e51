"""Dark Experience Replay (DER) and DER++: replay stored logits as well as stored labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Strategy

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


class DarkExperienceReplay(Strategy):
    """DER and DER++ (Buzzega et al. 2020, "Dark Experience for General Continual Learning: a Strong,
    Simple Baseline", NeurIPS 2020).

    The memory keeps raw inputs with the logits z the network gave them when they were trained on. Each step
    minimises

        L = CE(f(x), y) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

    with (x, y) the training batch, (x', z') and (x'', y'') two independent draws from the memory, MSE the
    mean squared error and CE the cross-entropy, both over every class of the stream (see `head`).
    beta = 0 is DER (the second draw is then skipped); beta > 0 is DER++. Matching logits sampled along the
    optimisation trajectory keeps the network's past responses, including its "dark knowledge" about
    non-target classes, which labels alone do not carry.

    Faithful to the paper and to Mammoth's implementation in what is stored and when:
    - the memory is offered every training batch after its step (reservoir sampling, the paper's choice;
      `memory.selection` may change it), not the task's data at its end;
    - it stores the raw uint8 input and the logits of the training forward pass (augmented input, train
      mode), taken before the step;
    - head "full" (default): as in Mammoth (and Avalanche), the classifier has a row for every class of the
      stream from the first task on, and both cross-entropies run over all of them. Classes still to come
      are thus trained as negatives, their logits pushed down, and these low logits are what the memory
      stores and the logit term later asks for. Only evaluation looks at the classes seen so far (class-IL:
      argmax over them; task-IL: over the sample's own task), as Mammoth's evaluation does.
    - head "growing": this project's growing head; the cross-entropies run over the classes seen so far
      and the rows of future classes stay the head's pre-drawn initial rows. The memory then stores those
      untrained rows' outputs for classes not yet seen, and the logit term pins the network to them once
      they are learned; with one pass over the data this loses the old tasks. No reference does this; it
      is kept to compare with earlier results.

    The three batches share one forward pass, where Mammoth runs three (batch-norm statistics then mix the
    batches, as in this project's replay). Defaults: memory 200 samples, replay batches as large as the
    training batch (Mammoth's `minibatch_size`, 32 for Seq-CIFAR-10). Weights: the paper's best values for Seq-CIFAR-10
    with a 200-sample buffer (its appendix table of selected hyper-parameters, which Mammoth ships as
    `utils/best_args.py`): DER alpha 0.3 (also at 500 and 5120); DER++ alpha 0.1, beta 0.5 (at 500: alpha
    0.2, beta 0.5). Avalanche's `DER` defaults to alpha 0.1, beta 0.5; note
    that Avalanche fills a class-balanced memory at task end with end-of-task logits and draws one replay
    batch for both terms, where the paper (and this class) uses reservoir, per-step logits, two draws."""

    supports_online = True  # learns and fills its memory batch by batch

    def __init__(
        self,
        memory: Memory,
        alpha: float,
        beta: float,
        replay_batch_size: int | None = None,
        head: str = "full",
    ):
        if alpha < 0 or beta < 0:
            raise ValueError(f"DER weights must be 0 or more, got alpha={alpha}, beta={beta}")
        if head not in ("full", "growing"):
            raise ValueError(f"DER's head must be full or growing, got {head!r}")
        self.memory = memory
        self.alpha, self.beta = float(alpha), float(beta)
        self.replay_batch_size = replay_batch_size
        self.head = head

    def before_task(self, task: Task) -> None:
        if self.head == "full":
            # every class of the stream is a trainable row from the first task on (Mammoth's head); the
            # engine's growth to the task's classes is then a no-op, and evaluation still slices the seen ones
            self.model.head.grow(self.stream.n_classes)

    def draw(self, batch: Batch) -> list[Tensor]:
        """Memory rows of the step's replay batches: one for the logit term, a second for the label term."""
        if not len(self.memory):
            return []
        return [self.memory.draw(self.replay_size(batch), self.rng) for _ in range(2 if self.beta else 1)]

    def objective(self, batch: Batch) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The step's loss; the logits of its one forward pass over every class of the stream (the training
        batch first, then the replay batches in order); the memory rows replayed. The cross-entropies run
        over the head's trainable rows: every class with head "full", the seen ones with "growing"."""
        n, seen = len(batch), self.model.head.n_classes
        rows = self.draw(batch)
        x = self.context.preprocess(torch.cat([batch.x, *(self.memory.x[r] for r in rows)]), self.rng)
        logits = self.model.forward_all(x)
        loss = F.cross_entropy(logits[:n, :seen], batch.y)
        if rows:
            k = len(rows[0])
            loss = loss + self.alpha * F.mse_loss(
                logits[n : n + k].float(), self.memory.extras["logits"][rows[0]]
            )
            if self.beta:
                loss = loss + self.beta * F.cross_entropy(logits[n + k :, :seen], self.memory.y[rows[1]])
        return loss, logits, rows

    def loss(self, batch: Batch) -> Tensor:
        return self.objective(batch)[0]

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        with runner.autocast():
            loss, logits, _ = self.objective(batch)
        if runner.backward(loss):
            runner.step()
            # After the step, so a batch is never replayed on its own step. A skipped (non-finite) batch
            # is not stored: its logits would poison the memory.
            self.remember_samples(batch.x, batch.y, logits=logits[: len(batch)].detach().float())
        return loss.detach()
