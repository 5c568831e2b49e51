"""ER-ACE: experience replay whose incoming batch is trained with an asymmetric (masked) cross-entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from incr_cli.data.batches import Batch
from incr_cli.data.stream import Task
from incr_cli.memory import Memory
from incr_cli.strategies.base import Context, Strategy

if TYPE_CHECKING:
    from incr_cli.step import StepRunner


def incoming_logit_mask(y: Tensor, seen: Tensor) -> Tensor:
    """The classes whose logits the incoming batch's loss keeps: the labels present in the batch, and the
    classes that no incoming batch has shown yet. `seen` is a boolean vector over the head's classes."""
    present = torch.zeros_like(seen).index_fill_(0, y, True)
    return present | ~seen


def cosine_scores(features: Tensor, weight: Tensor, scale: float = 10.0, eps: float = 1e-5) -> Tensor:
    """scale * cos(feature, class row), no bias: the classifier of the ER-ACE authors' code (`distLinear`,
    scale 10, norms offset by eps) that Mammoth's `er_ace` also installs by default."""
    features = features / (features.norm(dim=1, keepdim=True) + eps)
    weight = weight / (weight.norm(dim=1, keepdim=True) + eps)
    return scale * features @ weight.t()


def masked_cross_entropy(logits: Tensor, y: Tensor, keep: Tensor) -> Tensor:
    """Cross-entropy over the columns where `keep` is true only: the others get the dtype's lowest value,
    so they take no probability mass and receive no gradient (Caccia et al. 2022, the incoming term)."""
    return F.cross_entropy(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), y)


class ERACE(Strategy):
    """ER-ACE (Caccia et al. 2022, "New Insights on Reducing Abrupt Representation Change in Online
    Continual Learning", ICLR), experience replay with the asymmetric cross-entropy.

    With an incoming batch (X_in, Y_in) and a batch (X_mem, Y_mem) drawn uniformly from the memory,

        L = CE_{C_in}(f(X_in), Y_in) + CE_{C_seen}(f(X_mem), Y_mem),

    where CE_C is the softmax cross-entropy over the logits of the classes in C only. C_seen is every class
    seen so far (the whole head), so replayed samples are trained as in plain replay. C_in holds the
    classes present in the incoming batch, and the classes no incoming batch has shown yet: the incoming
    samples then cannot push the logits of old classes down, which is what moves old representations
    abruptly when new classes arrive. The paper states the incoming term over the current task's classes;
    the authors' code (github.com/pclucas14/AML) and Mammoth's `er_ace` keep the labels present in the
    incoming batch and also unmask the not-yet-seen classes, which this follows. Options, each default
    following the authors' code:
    - classifier "cosine" (default): scores are 10 x the cosine between the features and each class's row,
      no bias (the authors' `distLinear`, which their code uses for ER-ACE and ER-AML, and Mammoth's
      `use_custom_classifier`, on by default); "linear": the network's linear head.
    - head "full" (default): both references' heads score every class of the stream from the start, so the
      replayed term runs over all classes and the incoming term keeps every class not shown yet, future
      ones included; evaluation still looks at the seen classes only. "growing": this project's head of the
      classes seen so far (earlier behaviour).
    - task_free true (default): the mask and the replay term apply from the first batch (the authors' code
      forces this for ER-ACE; Mammoth's Seq-CIFAR-10 config sets it); false: they start with the second task
      (Mammoth's argument default), the first task being trained with the plain cross-entropy.

    Memory: each incoming sample is offered to the memory right after its update (reservoir by default,
    the paper's choice; `memory.selection` may change it), so the memory is filled online, during the task.
    The paper trains online (one epoch); with more epochs a sample is offered once, during its task's first
    epoch, so that the reservoir stays a uniform sample of the stream (Mammoth offers every epoch's batches
    again, which can store duplicates).

    Defaults: replay batch equal to the incoming batch (the paper's 10 + 10; Mammoth's `minibatch_size`);
    memory 200. Differences from the reference code: one forward pass over the joined incoming and replayed
    batch (as incr's replay; two passes differ only through batch-norm statistics), and the not-yet-seen
    classes are found exactly rather than as every label from the highest seen one on."""

    supports_online = True  # learns and fills its memory batch by batch

    def __init__(
        self,
        memory: Memory,
        replay_batch_size: int | None = None,
        classifier: str = "cosine",
        head: str = "full",
        task_free: bool = True,
    ):
        if classifier not in ("cosine", "linear"):
            raise ValueError(f"ER-ACE's classifier must be cosine or linear, got {classifier!r}")
        if head not in ("full", "growing"):
            raise ValueError(f"ER-ACE's head must be full or growing, got {head!r}")
        self.memory = memory
        self.replay_batch_size = replay_batch_size
        self.classifier, self.head, self.task_free = classifier, head, bool(task_free)
        self.task_id = 0
        self.to_offer = 0  # samples of the current task not yet offered to the memory

    def setup(self, context: Context) -> None:
        super().setup(context)
        # classes shown by an incoming batch so far; kept on the device so that masking never syncs
        self.seen = torch.zeros(self.stream.n_classes, dtype=torch.bool, device=context.device)

    def before_task(self, task: Task) -> None:
        if self.head == "full":
            self.model.head.grow(self.stream.n_classes)  # every class a trainable row, as the references
        self.task_id = task.id
        self.to_offer = len(self.training_indices(task))

    def scores(self, x: Tensor, every_class: bool = False) -> Tensor:
        """Class scores of preprocessed inputs: the head's trainable rows, or every class of the stream."""
        if self.classifier == "linear":
            return self.model.forward_all(x) if every_class else self.model(x)
        head = self.model.head
        weight = head.weight
        if every_class:
            weight = torch.cat([weight, head.future_weight[head.n_classes :]])
        return cosine_scores(self.model.backbone(x), weight)

    def logits(self, batch: Batch) -> Tensor:
        scores = self.scores(self.context.preprocess(batch.x, self.rng))
        if self.context.scenario == "task_il":
            scores = self.own_task_scores(scores, batch.y)
        return scores

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.scores(x, every_class=True)

    def loss(self, batch: Batch) -> Tensor:
        self.seen.index_fill_(0, batch.y, True)
        if self.task_id == 0 and not self.task_free:
            return F.cross_entropy(self.logits(batch), batch.y)
        n = len(batch)
        batch = self.with_replay(batch)
        logits = self.logits(batch)
        keep = incoming_logit_mask(batch.y[:n], self.seen[: logits.shape[1]])
        loss = masked_cross_entropy(logits[:n], batch.y[:n], keep)
        if len(batch) > n:
            loss = loss + F.cross_entropy(logits[n:], batch.y[n:])
        return loss

    def training_step(self, batch: Batch, runner: StepRunner) -> Tensor:
        loss = super().training_step(batch, runner)
        if self.to_offer > 0:
            n = min(self.to_offer, len(batch))
            self.remember_samples(batch.x[:n], batch.y[:n])
            self.to_offer -= n
        return loss

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "seen": self.seen,
            "task_id": self.task_id,
            "to_offer": self.to_offer,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = state["seen"].to(self.seen.device)
        self.task_id, self.to_offer = int(state["task_id"]), int(state["to_offer"])
