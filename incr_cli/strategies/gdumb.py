"""GDumb: a greedy class-balanced memory, and a model trained from scratch on that memory alone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Strategy

INITIAL_WEIGHTS = ("fresh", "first")


class GreedyClassBalancedMemory(Memory):
    """GDumb's sampler (Prabhu et al. 2020, Sec. 3): samples are offered one at a time. With k the memory
    size and n the number of classes in the memory, a sample of class y is stored when y is not in the
    memory yet or holds fewer than floor(k / n) samples; when the memory is full, a sample drawn uniformly
    from the largest class (on a tie, the class whose oldest stored sample came first) makes room for it.
    Otherwise it is dropped. Once the memory is full, the classes thus end within one sample of each other
    when the stream offers enough of each, whatever its order. The rule as the GDumb agent of Mai et al.'s
    online continual learning survey implements it (github.com/RaptorMai/online-continual-learning);
    storage, drawing and checkpointing are `Memory`'s."""

    def __init__(self, size: int = 200):
        super().__init__(size, selection="class_balanced")
        self.selection = "greedy_class_balanced"

    def _select(self, x, y, generator, features, extras) -> None:
        """The greedy rule, over the samples in the given order (`features` is unused)."""
        n_old = len(self)
        # Rows of each class, old rows numbered 0..n_old-1 and offered ones n_old + i; classes in label order
        # first, then in order of arrival (the tie-break of the largest class).
        members: dict[int, list[int]] = {}
        for row, label in enumerate(self.y.tolist()):
            members.setdefault(label, []).append(row)
        stored = n_old
        # One uniform number per offered sample picks the victim of an eviction: a single draw from the
        # generator whatever the number of evictions, and no device synchronisation per sample.
        uniform = torch.rand(len(y), generator=generator, device=generator.device).tolist()
        for i, label in enumerate(y.tolist()):
            quota = self.size // max(1, len(members))
            own = members.get(label)
            if own is not None and len(own) >= quota:
                continue
            if stored >= self.size:
                victims = max(members.values(), key=len)
                j = min(int(uniform[i] * len(victims)), len(victims) - 1)
                victims[j] = victims[-1]
                victims.pop()
                stored -= 1
            members.setdefault(label, []).append(n_old + i)
            stored += 1
        kept = torch.tensor(sorted(row for rows in members.values() for row in rows), dtype=torch.long)
        old = kept[kept < n_old].to(self.y.device)
        new = (kept[kept >= n_old] - n_old).to(y.device)
        self.x = torch.cat([self.x[old], x[new]])
        self.y = torch.cat([self.y[old], y[new]])
        self.extras = {k: torch.cat([v[old], extras[k][new]]) for k, v in self.extras.items()}


class GDumb(Strategy):
    """GDumb (Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress in
    Continual Learning", ECCV): a Greedy sampler and a Dumb learner.

    The learner never trains on the stream (`training_indices` is empty, so the engine runs no batch). At
    the end of each task, the task's training samples are offered to the greedy class-balanced memory in a
    random order (`GreedyClassBalancedMemory`), every module of the model is re-initialised
    (`reset_parameters`, drawing from torch's global generator, which checkpoints keep; the head's active
    rows get nn.Linear's default initialisation), and the model is trained from scratch on the memory
    alone: minimise (1/|M|) sum_{(x, y) in M} CE(f(x), y) with the run's optimizer, for `epochs` epochs of
    `batch_size` samples (default: the run's), with the run's augmentation. The model after task t thus
    depends only on the memory (and the random draws), never on the weights learned before.

    Defaults: memory 200 (digits stream) / 500 (Split Fashion-MNIST); the run's optimizer, batch and epochs,
    as Avalanche's GDumb (the Split Fashion-MNIST reference). `initial_weights`: `fresh` (default) draws new
    weights before every retraining, "from scratch" as the paper says; `first` restores the weights the
    network started the run with (each class's head row as first drawn), as Avalanche's GDumbPlugin does.
    Left out: the paper's long-schedule recipe, which Mammoth's
    defaults give as SGD from lr 0.05 with a warm-up epoch and cosine annealing with warm restarts down to
    0.0005, cutmix (alpha 1) and 256 epochs; `epochs`, `batch_size` and the run's optimizer are the knobs that
    remain. The memory training steps through the step runner (`Strategy.run_stage`): the run's precision and
    non-finite policy where the engine provides its runner (`Context.make_step_runner`), else full precision,
    stopping on a non-finite loss (GDumb takes no step in a task's epochs: there is no runner to copy).
    Mammoth's `gdumb` fills a reservoir memory instead and trains only after the last task."""

    def __init__(
        self,
        memory: GreedyClassBalancedMemory,
        epochs: int | None = None,
        batch_size: int | None = None,
        initial_weights: str = "fresh",
    ):
        if initial_weights not in INITIAL_WEIGHTS:
            raise ValueError(
                f"strategy.initial_weights={initial_weights!r}; valid: {', '.join(INITIAL_WEIGHTS)}"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"strategy.epochs={epochs} must be a positive integer or null")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"strategy.batch_size={batch_size} must be a positive integer or null")
        self.memory = memory
        self.epochs, self.batch_size = epochs, batch_size
        self.initial_weights = initial_weights
        # initial_weights=first: the backbone's weights as the run started, restored before each retraining
        self.first_backbone: dict[str, Tensor] | None = None

    def setup(self, context) -> None:
        super().setup(context)
        if self.initial_weights == "first":  # GDumb never trains on the stream: these are the initial weights
            self.first_backbone = {k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()}

    def training_indices(self, task: Task) -> Tensor:
        return task.train_index[:0]

    def after_task(self, task: Task) -> None:
        order = torch.randperm(len(task.train_index), generator=self.rng, device=self.rng.device)
        rows = task.train_index[order.to(task.train_index.device)]
        self.remember_rows(rows)
        self.reinitialise()
        self.fit_memory(f"task {task.id + 1}, memory training")

    def reinitialise(self) -> None:
        """Fresh weights for every module, drawn from torch's global generator; with initial_weights=first,
        the backbone's first weights and the head rows as first drawn (the head keeps them as `future_*`)."""
        head = self.model.head
        if self.first_backbone is not None:
            self.model.backbone.load_state_dict(self.first_backbone)
            with torch.no_grad():
                head.weight.copy_(head.future_weight[: head.n_classes])
                head.bias.copy_(head.future_bias[: head.n_classes])
            return
        for module in self.model.modules():
            if module is head:
                reset_linear(head.weight, head.bias)
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    def fit_memory(self, name: str = "memory training") -> None:
        """Train the model on the memory alone with the run's optimizer (`name`: the stage, in errors)."""
        if not len(self.memory):
            return
        optimizer = self.context.make_optimizer(self.model.parameters())
        self.model.train()

        def memory_loss(batch: Batch) -> Tensor:
            return F.cross_entropy(self.logits(batch), batch.y)

        epochs = self.epochs or self.context.epochs
        self.run_stage(self.memory, memory_loss, optimizer, epochs, batch_size=self.batch_size, name=name)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.first_backbone is not None:
            state["first_backbone"] = self.first_backbone
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "first_backbone" in state:
            self.first_backbone = state["first_backbone"]


@torch.no_grad()
def reset_linear(weight: nn.Parameter, bias: nn.Parameter) -> None:
    """nn.Linear's default initialisation (Kaiming-uniform with a = sqrt(5); bias uniform in +-1/sqrt(fan_in))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)
