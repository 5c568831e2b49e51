"""GDumb: the greedy class-balanced sampler by hand, and a model that owes everything to its memory on digits."""

from __future__ import annotations

import torch
from conftest import assert_resumes_exactly, compose_config, final_accuracy, run_experiment

from incr_cli.strategies.gdumb import GreedyClassBalancedMemory


def offer(memory: GreedyClassBalancedMemory, labels: list[int], first_id: int, generator: torch.Generator):
    """Offer samples whose single pixel is a running id, so that the test can tell which ones were kept."""
    ids = torch.arange(first_id, first_id + len(labels), dtype=torch.int32)[:, None]
    memory.add(ids, torch.tensor(labels), generator)


def kept(memory: GreedyClassBalancedMemory) -> dict[int, list[int]]:
    return {c: sorted(memory.x[memory.y == c, 0].tolist()) for c in torch.unique(memory.y).tolist()}


# ----------------------------------------------------------------------------------------- the sampler by hand
def test_greedy_sampler_evicts_from_the_largest_class_until_the_classes_are_balanced():
    generator = torch.Generator().manual_seed(0)
    memory = GreedyClassBalancedMemory(size=4)
    offer(memory, [0, 0, 0, 0], 0, generator)  # room for all: ids 0-3
    assert kept(memory) == {0: [0, 1, 2, 3]}
    offer(memory, [0], 4, generator)  # class 0 holds 4 >= 4 // 1: dropped
    assert kept(memory) == {0: [0, 1, 2, 3]}
    offer(memory, [1], 5, generator)  # a new class: a random sample of class 0 (the largest) makes room
    assert len(kept(memory)[0]) == 3 and kept(memory)[1] == [5]
    offer(memory, [1, 1], 6, generator)  # id 6: 1 < 4 // 2, evicts from class 0; id 7: 2 >= 2, dropped
    assert len(kept(memory)[0]) == 2 and kept(memory)[1] == [5, 6]
    offer(memory, [2, 2], 8, generator)  # id 8: new class, evicts from class 0 (tied with 1, met first)
    assert [len(v) for v in kept(memory).values()] == [1, 2, 1] and kept(memory)[2] == [8]
    assert set(kept(memory)[0]) < {0, 1, 2, 3} and len(memory) == 4 and memory.n_seen == 10


def test_greedy_sampler_balances_an_imbalanced_stream_in_any_order():
    generator = torch.Generator().manual_seed(0)
    memory = GreedyClassBalancedMemory(size=60)
    labels = torch.tensor([0] * 500 + [1] * 100 + [2] * 50)
    for chunk in labels[torch.randperm(len(labels), generator=generator)].split(64):
        offer(memory, chunk.tolist(), 0, generator)
    assert torch.bincount(memory.y).tolist() == [20, 20, 20]
    # a stream sorted by class (the worst order) ends balanced too
    memory = GreedyClassBalancedMemory(size=60)
    offer(memory, labels.tolist(), 0, generator)
    assert torch.bincount(memory.y).tolist() == [20, 20, 20]


def test_greedy_sampler_keeps_its_state_through_a_checkpoint():
    generator = torch.Generator().manual_seed(0)
    memory = GreedyClassBalancedMemory(size=5)
    offer(memory, [0, 1, 0, 1, 2, 2], 0, generator)
    restored = GreedyClassBalancedMemory(size=5)
    restored.load_state_dict(memory.state_dict())
    assert kept(restored) == kept(memory) and restored.n_seen == 6


def test_the_model_after_a_task_depends_only_on_the_memory_and_the_random_draws(tmp_path):
    """Re-initialisation and training on the memory erase whatever the weights were before."""
    from incr_cli.engine import Run

    cfg = compose_config(["strategy=gdumb", "epochs=2", "hardware=cpu"])
    run = Run(cfg, tmp_path, {"strategy": "gdumb", "dataset": "digits", "model": "mlp"})
    task = run.stream.tasks[0]
    run.model.head.grow(len(task.classes))
    gdumb = run.strategy
    gdumb.memory.add(run.stream.train_x[task.train_index], run.stream.train_y[task.train_index], run.rng)

    def retrain() -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        run.rng.manual_seed(7)
        gdumb.reinitialise()
        gdumb.fit_memory()
        return {k: v.clone() for k, v in run.model.state_dict().items()}

    first = retrain()
    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.fill_(0.5)  # weights that a different past would have left
    second = retrain()
    for key, value in first.items():
        assert torch.equal(second[key], value), key


# ----------------------------------------------------------------------------------------- on digits
def test_gdumb_beats_finetune_from_a_class_balanced_memory_on_digits(tmp_path):
    finetune = run_experiment(tmp_path / "ft", ["strategy=finetune"])
    gdumb = run_experiment(tmp_path / "gdumb", ["strategy=gdumb"])
    assert final_accuracy(gdumb) > final_accuracy(finetune) + 0.3
    # the stream itself is never trained on: every step is the memory's, inside after_task
    assert [t["steps"] for t in gdumb["per_task"]] == [0] * 5
    assert [t["memory_samples"] for t in gdumb["per_task"]] == [200] * 5
    state = torch.load(tmp_path / "gdumb" / "checkpoints" / "last.pt", weights_only=True)["strategy"]
    assert torch.bincount(state["memory"]["y"]).tolist() == [20] * 10
    # after the first task the memory holds 100 of each of its two classes
    first = torch.load(tmp_path / "gdumb" / "checkpoints" / "task_1.pt", weights_only=True)["strategy"]
    assert torch.bincount(first["memory"]["y"]).tolist() == [100, 100]


def test_gdumb_runs_under_mixed_precision(tmp_path):
    metrics = run_experiment(
        tmp_path / "amp", ["strategy=gdumb", "hardware=amp", "epochs=5", "dataset.n_tasks=2"]
    )
    assert metrics["run"]["status"] == "finished"
    assert final_accuracy(metrics) > 0.5


def test_gdumb_resumes_exactly(tmp_path):
    # no stream batch is ever trained, so the run is stopped between tasks, after task 2's checkpoint
    resumed = assert_resumes_exactly(tmp_path, ["strategy=gdumb", "epochs=2"], fault="task_end:2:SIGTERM")
    assert resumed["run"]["status"] == "finished"


def test_first_initial_weights_restore_the_weights_the_run_started_with(tmp_path):
    """initial_weights=first (Avalanche's GDumbPlugin): every retraining starts from the run's first weights,
    the head's rows as first drawn; fresh draws new ones."""
    from incr_cli.engine import Run

    cfg = compose_config(["strategy=gdumb", "strategy.initial_weights=first", "epochs=1", "hardware=cpu"])
    run = Run(cfg, tmp_path, {"strategy": "gdumb", "dataset": "digits", "model": "mlp"})
    start = {k: v.clone() for k, v in run.model.backbone.state_dict().items()}
    head = run.model.head
    first_rows = head.future_weight[:4].clone()
    run.model.head.grow(4)
    gdumb = run.strategy
    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.add_(1.0)  # weights that training would have left
    gdumb.reinitialise()
    for key, value in start.items():
        assert torch.equal(run.model.backbone.state_dict()[key], value), key
    assert torch.equal(head.weight, first_rows)
    fresh = compose_config(["strategy=gdumb", "epochs=1", "hardware=cpu"])
    (tmp_path / "fresh").mkdir()
    other = Run(fresh, tmp_path / "fresh", {"strategy": "gdumb", "dataset": "digits", "model": "mlp"})
    before = other.model.backbone.layers[1].weight.clone()
    other.strategy.reinitialise()
    assert not torch.equal(other.model.backbone.layers[1].weight, before)


def test_gdumb_with_first_weights_resumes_exactly(tmp_path):
    resumed = assert_resumes_exactly(
        tmp_path, ["strategy=gdumb", "strategy.initial_weights=first", "epochs=2"], fault="task_end:2:SIGTERM"
    )
    assert resumed["run"]["status"] == "finished"
