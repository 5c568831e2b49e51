"""Replay memories: reservoir sampling keeps every sample with the same probability, class-balanced
selection splits the budget evenly, sampling and state round trips behave as replay needs."""

from __future__ import annotations

import io

import pytest
import torch

from incr_cli.memory import Memory


def samples(first: int, n: int, label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n tiny uint8 images whose pixels encode their id (mod 256); labels are the ids, or one class."""
    ids = torch.arange(first, first + n)
    x = (ids % 256).to(torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    y = ids.clone() if label is None else torch.full((n,), label, dtype=torch.long)
    return x, y


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_images_match_labels(memory: Memory) -> None:
    """Every kept image is still next to its own label (ids in the labels, see `samples`)."""
    assert torch.equal(memory.x[:, 0, 0, 0].long(), memory.y % 256)


# ----------------------------------------------------------------------------------------- reservoir
STREAM, SIZE, TRIALS = 1_000, 100, 300
CHUNKS = (150, 250, 100, 500)  # several add() calls: the first fills and overflows the memory


def reservoir_inclusion_counts(keep) -> torch.Tensor:
    """How often each of the STREAM positions ended in a memory of SIZE, over TRIALS generator seeds."""
    counts = torch.zeros(STREAM)
    for trial in range(TRIALS):
        kept = keep(generator(trial))
        assert len(kept) == SIZE and len(set(kept.tolist())) == SIZE  # SIZE distinct samples
        counts[kept] += 1
    return counts


def incr_reservoir(g: torch.Generator) -> torch.Tensor:
    memory, first = Memory(SIZE, "reservoir"), 0
    for n in CHUNKS:
        memory.add(*samples(first, n), g)
        first += n
    assert memory.n_seen == STREAM
    assert_images_match_labels(memory)
    return memory.y


def reservoir_is_uniform(counts: torch.Tensor) -> bool:
    """Each position is kept with probability SIZE/STREAM = 0.1, so its count over TRIALS runs is
    Binomial(300, 0.1): mean 30, variance 300 * 0.1 * 0.9 = 27.

    - chi-square: X = sum_p (c_p - 30)^2 / 30 has mean 1000 * 27 / 30 = 900 and standard deviation about
      sqrt(2 * 1000) * 0.9 = 40; the bound 1150 is six standard deviations up.
    - blocks of 100 consecutive positions (early vs late samples): mean 3000, sd at most
      sqrt(100 * 27) = 52; the bound 300 is about six standard deviations.
    "Keep the first 100" or "keep the last 100" give X = 100 * 270^2/30 + 900 * 30 = 270,000 and blocks
    of 30,000 and 0."""
    expected = TRIALS * SIZE / STREAM
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    blocks = counts.reshape(10, 100).sum(1)
    return chi_square < 1150 and bool((blocks - 100 * expected).abs().max() < 300)


def test_reservoir_keeps_each_seen_sample_with_equal_probability():
    counts = reservoir_inclusion_counts(incr_reservoir)
    assert counts.sum() == TRIALS * SIZE
    assert reservoir_is_uniform(counts)


@pytest.mark.parametrize("biased", ["first", "last", "per_chunk"])
def test_the_reservoir_check_rejects_biased_selections(biased):
    """The statistic above must be able to fail: biased memories that also keep 100 distinct samples."""

    def keep(g: torch.Generator) -> torch.Tensor:
        if biased == "first":
            return torch.arange(SIZE)
        if biased == "last":
            return torch.arange(STREAM - SIZE, STREAM)
        # each chunk gets a share of the memory proportional to 1/len(chunks), not to its length
        bounds = torch.tensor((0, *CHUNKS)).cumsum(0)
        picks = [
            lo + torch.randperm(int(hi - lo), generator=g)[: SIZE // len(CHUNKS)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(picks)

    assert not reservoir_is_uniform(reservoir_inclusion_counts(keep))


def test_reservoir_keeps_everything_while_there_is_room():
    memory = Memory(100, "reservoir")
    memory.add(*samples(0, 30), generator(0))
    memory.add(*samples(30, 40), generator(1))
    assert memory.y.tolist() == list(range(70))  # in the order offered
    assert memory.n_seen == 70
    assert_images_match_labels(memory)


def test_reservoir_is_deterministic_for_the_same_generator_seed():
    first, second = incr_reservoir(generator(7)), incr_reservoir(generator(7))
    assert torch.equal(first, second)
    assert not torch.equal(first, incr_reservoir(generator(8)))


# ----------------------------------------------------------------------------------------- class-balanced
def class_counts(memory: Memory) -> dict[int, int]:
    labels, counts = torch.unique(memory.y, return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist(), strict=True))


def test_class_balanced_gives_each_class_an_equal_share_remainder_to_the_lowest_labels():
    memory, g = Memory(10, "class_balanced"), generator(0)
    x0, y0 = samples(0, 20, label=0)
    x1, y1 = samples(20, 20, label=1)
    x2, y2 = samples(40, 20, label=2)
    memory.add(torch.cat([x0, x1, x2]), torch.cat([y0, y1, y2]), g)
    # 10 // 3 = 3 slots each, remainder 10 % 3 = 1 to label 0
    assert class_counts(memory) == {0: 4, 1: 3, 2: 3}
    memory.add(*samples(60, 20, label=3), g)
    # a fourth class: 10 // 4 = 2 each, remainder 2 to labels 0 and 1
    assert class_counts(memory) == {0: 3, 1: 3, 2: 2, 3: 2}
    # every kept image is a distinct sample of its own class: ids 20k..20k+19 have label k
    ids = memory.x[:, 0, 0, 0].long()
    assert torch.equal(ids // 20, memory.y)
    assert len(set(ids.tolist())) == len(memory)


def test_class_balanced_remainder_goes_to_the_lowest_labels_whatever_they_are():
    memory = Memory(11, "class_balanced")
    x = torch.cat([samples(0, 10, label=9)[0], samples(10, 10, label=5)[0], samples(20, 10, label=7)[0]])
    y = torch.tensor([9] * 10 + [5] * 10 + [7] * 10)
    memory.add(x, y, generator(0))
    # 11 // 3 = 3 each, remainder 2 to the two lowest labels, 5 and 7
    assert class_counts(memory) == {5: 4, 7: 4, 9: 3}


# ----------------------------------------------------------------------------------------- sampling, state
def full_memory(size: int = 100) -> Memory:
    memory = Memory(size, "reservoir")
    memory.add(*samples(0, size), generator(0))
    return memory


def test_sample_draws_without_replacement_when_the_memory_holds_enough():
    memory = full_memory()
    for n in (30, 100):
        batch = memory.sample(n, generator(n))
        assert len(batch) == n
        assert len(set(batch.y.tolist())) == n  # no sample twice
        assert set(batch.y.tolist()) <= set(range(100))
        assert torch.equal(batch.x[:, 0, 0, 0].long(), batch.y)


def test_sample_draws_with_replacement_when_asked_for_more_than_the_memory_holds():
    memory = full_memory(10)
    batch = memory.sample(50, generator(0))
    assert len(batch) == 50
    assert set(batch.y.tolist()) <= set(range(10))  # 50 draws from 10 samples must repeat


def test_sample_is_deterministic_for_the_same_generator_seed():
    memory = full_memory()
    assert torch.equal(memory.sample(32, generator(3)).y, memory.sample(32, generator(3)).y)
    assert not torch.equal(memory.sample(32, generator(3)).y, memory.sample(32, generator(4)).y)


def test_state_dict_round_trip_restores_the_memory_exactly():
    memory = Memory(100, "reservoir")
    memory.add(*samples(0, 250), generator(0))
    # through bytes, the way a checkpoint stores it (weights_only loading)
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = Memory(100, "reservoir")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.x, memory.x) and torch.equal(restored.y, memory.y)
    assert restored.n_seen == memory.n_seen == 250
    # and it goes on exactly as the original would: the acceptance probability depends on n_seen
    memory.add(*samples(250, 300), generator(1))
    restored.add(*samples(250, 300), generator(1))
    assert torch.equal(restored.y, memory.y)


def test_memory_size_counts_images_and_labels():
    memory = full_memory(100)
    # 100 images of 1x2x2 uint8 (4 bytes each) + 100 int64 labels (8 bytes each) = 400 + 800
    assert memory.nbytes == 1200
    assert len(memory) == 100


def test_a_memory_of_size_zero_keeps_nothing():
    memory = Memory(0, "reservoir")
    memory.add(*samples(0, 50), generator(0))
    assert len(memory) == 0
    assert memory.nbytes == 0
    balanced = Memory(0, "class_balanced")
    balanced.add(*samples(0, 50, label=1), generator(0))
    assert len(balanced) == 0


def test_a_bad_selection_or_negative_size_is_refused():
    with pytest.raises(ValueError, match="herd"):
        Memory(10, "herd")
    with pytest.raises(ValueError, match="-1"):
        Memory(-1, "reservoir")
