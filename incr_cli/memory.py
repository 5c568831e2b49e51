"""Replay memories: a fixed budget of raw uint8 samples on the training device, and how they are chosen."""

from __future__ import annotations

import torch
from torch import Tensor

from incr_cli.data.batches import Batch

SELECTIONS = ("reservoir", "class_balanced", "herding")


class Memory:
    """`size` samples kept across all tasks, with optional per-sample extras (e.g. DER's logits).

    - `reservoir` (Vitter 1985; replay: Chaudhry et al. 2019): after n samples have streamed past, each one
      is in the memory with probability size/n.
    - `class_balanced`: size // classes-seen slots per class (the remainder to the lowest labels). A class
      keeps its samples in arrival order and new samples queue behind them in random order; each class
      keeps the first samples of its queue that fit its quota.
    - `herding` (Welling 2009; iCaRL, Rebuffi et al. 2017, Alg. 4): as class_balanced, but a class's new
      samples queue in herding order: the k-th chosen sample p_k minimises
      || mu - (1/k) * (phi(p_k) + sum_{j<k} phi(p_j)) || over the unchosen ones, with phi the L2-normalised
      features and mu their class mean; shrinking a class keeps a prefix (iCaRL, Alg. 5)."""

    def __init__(self, size: int = 200, selection: str = "reservoir"):
        if size < 0:
            raise ValueError(f"memory size must be 0 or more, got {size}")
        if selection not in SELECTIONS:
            raise ValueError(f"memory selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        self.size, self.selection = size, selection
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.extras: dict[str, Tensor] = {}
        self.n_seen = 0

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    @property
    def needs_features(self) -> bool:
        return self.selection == "herding"

    @property
    def nbytes(self) -> int:
        if self.y is None:
            return 0
        return self.x.nbytes + self.y.nbytes + sum(t.nbytes for t in self.extras.values())

    def add(
        self,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        features: Tensor | None = None,
        **extras: Tensor,
    ) -> None:
        """Offer samples (in the given order) to the memory, with their extras; herding needs `features`."""
        if self.size == 0 or len(y) == 0:
            return
        if self.x is None:
            self.x, self.y = x[:0].clone(), y[:0].clone()
            self.extras = {name: value[:0].clone() for name, value in extras.items()}
        if set(extras) != set(self.extras):
            raise ValueError(f"memory extras {sorted(self.extras)} cannot take {sorted(extras)}")
        self._select(x, y, generator, features, extras)
        self.n_seen += len(y)

    def _select(self, x, y, generator, features, extras) -> None:
        """Decide which of the stored and offered samples stay; a memory with its own rule overrides this."""
        if self.selection == "reservoir":
            self._reservoir(x, y, generator, extras)
        else:
            if self.selection == "herding" and features is None:
                raise ValueError("herding selection needs the samples' features")
            self._per_class(x, y, generator, features, extras)

    def _reservoir(self, x: Tensor, y: Tensor, generator: torch.Generator, extras: dict[str, Tensor]) -> None:
        free = max(0, self.size - len(self))
        if free:
            self.x, self.y = torch.cat([self.x, x[:free]]), torch.cat([self.y, y[:free]])
            self.extras = {k: torch.cat([v, extras[k][:free]]) for k, v in self.extras.items()}
        rest = torch.arange(min(free, len(y)), len(y), device=y.device)
        if len(rest) == 0:
            return
        # Sample i (0-based over everything seen) draws a slot in [0, i]; it is kept if the slot is < size.
        # Vectorised: when several samples draw the same slot, the latest one wins, as in the sequential loop.
        position = self.n_seen + rest
        uniform = torch.rand(len(rest), generator=generator, device=generator.device).to(y.device)
        slot = (uniform * (position + 1)).long()
        kept = slot < self.size
        winner = torch.full((self.size,), -1, dtype=torch.long, device=y.device)
        winner.scatter_reduce_(0, slot[kept], rest[kept], reduce="amax")
        slots = torch.nonzero(winner >= 0).flatten()
        self.x[slots], self.y[slots] = x[winner[slots]], y[winner[slots]]
        for name, values in self.extras.items():
            values[slots] = extras[name][winner[slots]]

    def _per_class(self, x, y, generator, features, extras) -> None:
        new_order = []
        # No class keeps more than ceil(size / classes): herding need not order more (its order is a prefix).
        n_classes = len(torch.unique(torch.cat([self.y, y])))
        limit = -(-self.size // n_classes)
        for label in torch.unique(y).tolist():
            members = torch.nonzero(y == label).flatten()
            if features is None:
                order = torch.randperm(len(members), generator=generator, device=generator.device)
                new_order.append(members[order.to(members.device)])
            else:
                new_order.append(members[herding_order(features[members], limit=limit)])
        new_order = torch.cat(new_order)
        # Old samples first, then the new ones in their queue order; a stable sort by class keeps both orders.
        all_y = torch.cat([self.y, y[new_order]])
        classes = torch.unique(all_y)
        quota = torch.full((len(classes),), self.size // len(classes), device=all_y.device)
        quota[: self.size % len(classes)] += 1
        by_class = torch.sort(all_y, stable=True).indices
        class_index = torch.searchsorted(classes, all_y[by_class])
        first_of_class = torch.searchsorted(all_y[by_class], classes)
        rank = torch.arange(len(by_class), device=all_y.device) - first_of_class[class_index]
        keep = by_class[rank < quota[class_index]]
        keep = keep.sort().values  # back to arrival order: old samples, then new ones
        # only the kept samples of x are read (streamed images: `StreamedRows`)
        n_old = len(self.x)
        self.x = torch.cat([self.x[keep[keep < n_old]], x[new_order[keep[keep >= n_old] - n_old]]])
        self.y = all_y[keep]
        self.extras = {k: torch.cat([v, extras[k][new_order]])[keep] for k, v in self.extras.items()}

    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """Rows of n samples drawn uniformly: without replacement while the memory holds n or more."""
        if n <= len(self):
            rows = torch.randperm(len(self), generator=generator, device=generator.device)[:n]
        else:
            rows = torch.randint(0, len(self), (n,), generator=generator, device=generator.device)
        return rows.to(self.y.device)

    def batch(self, rows: Tensor) -> Batch:
        return Batch(self.x[rows], self.y[rows])

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        return self.batch(self.draw(n, generator))

    def state_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "extras": dict(self.extras), "n_seen": self.n_seen}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.y, self.n_seen = state["x"], state["y"], int(state["n_seen"])
        self.extras = dict(state.get("extras", {}))


class EpisodicMemory(Memory):
    """Samples kept in the order offered, none evicted: the episodic memories of GEM and A-GEM, whose method
    picks the samples each finished task keeps. `size` bounds the whole; an offer beyond it is an error."""

    def __init__(self, size: int):
        super().__init__(size)
        self.selection = "episodic"

    def _select(self, x, y, generator, features, extras) -> None:
        if len(self) + len(y) > self.size:
            raise ValueError(f"an episodic memory of {self.size} samples cannot take {len(y)} more")
        self.x, self.y = torch.cat([self.x, x]), torch.cat([self.y, y])
        self.extras = {k: torch.cat([v, extras[k]]) for k, v in self.extras.items()}


class RingBuffer(Memory):
    """The last `size` samples offered, oldest first (GEM's memory-to-be of the task in training, the
    authors' ring buffer); `clear` empties it."""

    def __init__(self, size: int):
        super().__init__(size)
        self.selection = "latest"

    def _select(self, x, y, generator, features, extras) -> None:
        # Copies, not views: a checkpoint would otherwise hold the whole concatenation.
        self.x = torch.cat([self.x, x])[-self.size :].clone()
        self.y = torch.cat([self.y, y])[-self.size :].clone()
        self.extras = {k: torch.cat([v, extras[k]])[-self.size :].clone() for k, v in self.extras.items()}

    def clear(self) -> None:
        self.x = self.y = None
        self.extras, self.n_seen = {}, 0


def herding_order(features: Tensor, limit: int | None = None) -> Tensor:
    """Indices of the first `limit` (default: all) `features` rows in herding order (Welling 2009; iCaRL,
    Rebuffi et al. 2017, Alg. 4)."""
    phi = torch.nn.functional.normalize(features.float(), dim=1)
    # With unit rows, ||mean - (r + phi_i) / k||^2 = const + (2 / k^2) (r . phi_i - k mean . phi_i): the argmin
    # needs two running dot products per row, not a distance to every row in every step.
    toward_mean = phi @ phi.mean(0)
    toward_chosen = torch.zeros_like(toward_mean)
    chosen = torch.zeros(len(phi), dtype=torch.bool, device=phi.device)
    order = []
    for k in range(1, min(len(phi), limit or len(phi)) + 1):
        score = toward_chosen - k * toward_mean
        score[chosen] = float("inf")
        pick = int(score.argmin())
        order.append(pick)
        chosen[pick] = True
        toward_chosen += phi @ phi[pick]
    return torch.tensor(order, device=features.device)
