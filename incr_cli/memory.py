"""Replay memories: a fixed budget of raw uint8 samples on the training device, and how they are chosen."""

from __future__ import annotations

import torch
from torch import Tensor

from incr_cli.data.batches import Batch

SELECTIONS = ("reservoir", "class_balanced")


class Memory:
    """`size` samples kept across all tasks.

    - `reservoir` (Vitter 1985, as used for replay by Chaudhry et al. 2019): after n samples have streamed
      past, each one is in the memory with probability size/n.
    - `class_balanced`: size // classes-seen slots per class (the remainder to the lowest labels), each
      filled with a uniform random choice among that class's kept and new samples."""

    def __init__(self, size: int = 200, selection: str = "reservoir"):
        if size < 0:
            raise ValueError(f"memory size must be 0 or more, got {size}")
        if selection not in SELECTIONS:
            raise ValueError(f"memory selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        self.size, self.selection = size, selection
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.n_seen = 0

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    @property
    def nbytes(self) -> int:
        return 0 if self.y is None else self.x.nbytes + self.y.nbytes

    def add(self, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
        """Offer the samples (in the given order) to the memory."""
        if self.size == 0 or len(y) == 0:
            return
        if self.x is None:
            self.x, self.y = x[:0].clone(), y[:0].clone()
        if self.selection == "reservoir":
            self._reservoir(x, y, generator)
        else:
            self._class_balanced(x, y, generator)
        self.n_seen += len(y)

    def _reservoir(self, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
        free = max(0, self.size - len(self))
        if free:
            self.x, self.y = torch.cat([self.x, x[:free]]), torch.cat([self.y, y[:free]])
        rest = torch.arange(free, len(y), device=y.device)
        if len(rest) == 0:
            return
        # Sample i (0-based over everything seen) draws a slot in [0, i]; it is kept if the slot is < size.
        # Vectorised: when several samples draw the same slot, the latest one wins, as in the sequential loop.
        position = self.n_seen + rest
        slot = (torch.rand(len(rest), generator=generator, device=y.device) * (position + 1)).long()
        kept = slot < self.size
        winner = torch.full((self.size,), -1, dtype=torch.long, device=y.device)
        winner.scatter_reduce_(0, slot[kept], rest[kept], reduce="amax")
        slots = torch.nonzero(winner >= 0).flatten()
        self.x[slots], self.y[slots] = x[winner[slots]], y[winner[slots]]

    def _class_balanced(self, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
        all_x, all_y = torch.cat([self.x, x]), torch.cat([self.y, y])
        classes = torch.unique(all_y)
        quota = torch.full((len(classes),), self.size // len(classes))
        quota[: self.size % len(classes)] += 1
        keep = []
        for label, n in zip(classes.tolist(), quota.tolist(), strict=True):
            members = torch.nonzero(all_y == label).flatten()
            order = torch.randperm(len(members), generator=generator, device=generator.device)
            keep.append(members[order.to(members.device)[:n]])
        keep = torch.cat(keep)
        self.x, self.y = all_x[keep], all_y[keep]

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n samples drawn uniformly: without replacement while the memory holds n or more (as Mammoth's ER)."""
        if n <= len(self):
            rows = torch.randperm(len(self), generator=generator, device=generator.device)[:n]
        else:
            rows = torch.randint(0, len(self), (n,), generator=generator, device=generator.device)
        rows = rows.to(self.y.device)
        return Batch(self.x[rows], self.y[rows])

    def state_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "n_seen": self.n_seen}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.y, self.n_seen = state["x"], state["y"], int(state["n_seen"])
