"""Task-IL, domain-IL (permuted and rotated streams) and the online setting: the streams against their
definitions, the behaviour each exists for on real digits, and bad combinations as one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, incr, run_experiment

from incr_cli.cli import main
from incr_cli.data.sources import load_source
from incr_cli.data.stream import Stream, Task, build_stream, rotate_uint8
from incr_cli.strategies.base import Context, Strategy

FAST = ["hardware=cpu", "hardware.num_threads=1"]


def digits_stream(*overrides: str) -> tuple:
    cfg = compose_config(["dataset=digits", *overrides])
    source = load_source("digits", cfg.data)
    return source, build_stream(source, cfg.dataset)


def column_mapping(images: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """For each pixel of `images`, a pixel of `originals` holding the same value in every image (-1: none)."""
    same = (images.T[:, None, :] == originals.T[None, :, :]).all(2)  # [pixel of images, pixel of originals]
    return torch.where(same.any(1), same.float().argmax(1), torch.tensor(-1))


def test_a_permuted_stream_is_the_data_under_one_fixed_permutation_per_task():
    source, stream = digits_stream(
        "dataset.scenario=domain_il", "dataset.domains=permuted", "dataset.n_tasks=3"
    )
    n_train, n_test = len(source.train_y), len(source.test_y)
    assert len(stream.tasks) == 3 and all(t.classes == list(range(10)) for t in stream.tasks)
    originals, mappings = source.train_x.flatten(1), []
    for k in range(3):
        images = stream.train_x[k * n_train : (k + 1) * n_train].flatten(1)
        mapping = column_mapping(
            images, originals
        )  # every pixel comes from one pixel, the same in all images
        assert (mapping >= 0).all() and torch.equal(images, originals[:, mapping])
        test_images = stream.test_x[k * n_test : (k + 1) * n_test].flatten(1)
        assert torch.equal(test_images, source.test_x.flatten(1)[:, mapping])  # the same one at test time
        assert torch.equal(stream.train_y[k * n_train : (k + 1) * n_train], source.train_y)
        mappings.append(mapping)
    assert not torch.equal(mappings[0], mappings[1])
    # seeded by dataset.domain_seed alone: the run's seed does not change the stream
    _, again = digits_stream(
        "dataset.scenario=domain_il", "dataset.domains=permuted", "dataset.n_tasks=3", "seed=5"
    )
    assert torch.equal(again.train_x, stream.train_x)


def test_a_rotated_stream_turns_each_task_by_its_angle():
    x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    assert torch.equal(rotate_uint8(x, 90), torch.rot90(x, 1, (2, 3)))  # counter-clockwise
    assert torch.equal(rotate_uint8(x, 180), torch.rot90(x, 2, (2, 3)))
    source, stream = digits_stream(
        "dataset.scenario=domain_il",
        "dataset.domains=rotated",
        "dataset.n_tasks=2",
        "dataset.rotation_degrees=[0,90]",
    )
    n = len(source.train_y)
    assert torch.equal(stream.train_x[:n], source.train_x)
    assert torch.equal(stream.train_x[n:], torch.rot90(source.train_x, 1, (2, 3)))


def test_task_il_masks_the_scores_outside_each_samples_task():
    # 4 classes in 2 tasks of 2: a sample of class 3 (task 2) keeps scores 2 and 3 only.
    tasks = [
        Task(0, [0, 1], *[torch.empty(0, dtype=torch.long)] * 3),
        Task(1, [2, 3], *[torch.empty(0, dtype=torch.long)] * 3),
    ]
    empty = torch.empty(0)
    strategy = Strategy()
    strategy.stream = Stream(empty, empty, empty, empty, tasks, [0, 1, 2, 3], list("abcd"), 255)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    masked = strategy.own_task_scores(scores, torch.tensor([3, 0]))
    inf = float("inf")
    assert torch.equal(masked, torch.tensor([[-inf, -inf, 3.0, 4.0], [1.0, 2.0, -inf, -inf]]))
    assert Context.__dataclass_fields__["scenario"].default == "class_il"


def test_task_il_accuracy_is_at_least_class_il_accuracy_and_masked_training_helps_it(tmp_path):
    # digits, finetune, 5 tasks of 2, 10 epochs; measured task-IL final average accuracy, seed 0: 0.956 with
    # scenario=task_il (each head trained only against its own task's classes), 0.611 in class-IL training.
    task_il = run_experiment(tmp_path / "task_il", ["strategy=finetune", "dataset.scenario=task_il", *FAST])
    class_il = run_experiment(tmp_path / "class_il", ["strategy=finetune", *FAST])
    assert task_il["run"]["scenario"] == "task_il"
    matrices = task_il["task_il"]["accuracy_matrix"], task_il["class_il"]["accuracy_matrix"]
    for row_task, row_class in zip(*matrices, strict=True):
        assert all(t >= c for t, c in zip(row_task, row_class, strict=True))
    assert task_il["task_il"]["final_average_accuracy"] > class_il["task_il"]["final_average_accuracy"] + 0.2


@pytest.mark.parametrize("domains", ["permuted", "rotated"])
def test_replay_beats_finetune_in_domain_il_on_digits(tmp_path, domains):
    # Measured on 5 domains of digits, 5 epochs, seed 0, final average accuracy (forgetting):
    # permuted: replay 0.904 (0.09), finetune 0.373 (0.75); rotated 0..144: replay 0.884 (0.11), finetune 0.447 (0.65).
    settings = ["dataset.scenario=domain_il", f"dataset.domains={domains}", "epochs=5", *FAST]
    finetune = run_experiment(tmp_path / "finetune", ["strategy=finetune", *settings])
    replay = run_experiment(tmp_path / "replay", ["strategy=replay", *settings])
    assert finetune["run"]["scenario"] == "domain_il"
    # the log names the one accuracy a domain-IL run has, not a class-IL and a task-IL figure
    log_lines = (tmp_path / "replay" / "train.log").read_text().splitlines()
    task_lines = [line for line in log_lines if "average accuracy" in line]
    assert len(task_lines) == 5 and all(
        "(domain-IL);" in line and "task-IL" not in line for line in task_lines
    )
    assert replay["class_il"]["final_average_accuracy"] > finetune["class_il"]["final_average_accuracy"] + 0.3
    assert replay["class_il"]["average_forgetting"] < finetune["class_il"]["average_forgetting"] - 0.3


def test_online_makes_one_pass_with_a_batch_by_batch_method(tmp_path):
    metrics = run_experiment(
        tmp_path / "run",
        ["strategy=der", "train.online=true", "batch_size=10", "epochs=7", "dataset.n_tasks=2", *FAST],
    )
    assert metrics["run"]["online"] is True
    # one pass: each task's steps are its samples / 10, whatever `epochs` says
    for task, timing in zip(metrics["tasks"], metrics["per_task"], strict=True):
        assert timing["steps"] == -(-task["train_samples"] // 10)
    assert metrics["class_il"]["final_average_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset.scenario=domain_il"],
            "dataset.scenario=domain_il needs dataset.domains: one of permuted, rotated",
        ),
        (
            ["dataset.scenario=sideways"],
            "dataset.scenario=sideways is not valid; choose one of: class_il, task_il",
        ),
        (["dataset.domains=permuted"], "dataset.domains=permuted needs dataset.scenario=domain_il"),
        (
            ["dataset.scenario=domain_il", "dataset.domains=permuted", "strategy=lwf"],
            "LearningWithoutForgetting is not made for dataset.scenario=domain_il; its scenarios: class_il, task_il",
        ),
        (
            ["train.online=true", "strategy=replay"],
            "Replay does not learn online (train.online=true); strategies that do:",
        ),
    ],
)
def test_bad_scenario_settings_are_one_line_errors(tmp_path, capsys, overrides, message):
    # in this process (a child process pays 7 s of imports per case): main's exit status and stderr
    assert main(["train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_folder_domains_make_one_task_per_sub_folder(tmp_path):
    # Two domains of the same four digit classes: the digits as they are, and inverted (16 - pixel).
    from PIL import Image

    source = load_source("digits", compose_config([]).data)
    for domain, pixels in (("a_plain", source.train_x), ("b_inverted", 16 - source.train_x)):
        for label in range(4):
            folder = tmp_path / "images" / domain / str(label)
            folder.mkdir(parents=True)
            for i, image in enumerate(pixels[source.train_y == label][:60]):
                Image.fromarray((image[0].numpy().astype("uint8") * 15), "L").save(folder / f"{i}.png")
    settings = [
        "dataset=image_folder",
        "recipe=digits",
        "dataset.augment.crop_padding=0",
        "dataset.augment.horizontal_flip=false",
        f"dataset.folder={tmp_path / 'images'}",
        "dataset.channels=1",
        "dataset.image_size=8",
        "dataset.scenario=domain_il",
        "dataset.domains=folders",
        "dataset.n_tasks=2",
        f"data.root={tmp_path / 'cache'}",
        "strategy=replay",
        *FAST,
    ]
    metrics = run_experiment(tmp_path / "run", settings)
    assert [t["classes"] for t in metrics["tasks"]] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert [t["test_samples"] for t in metrics["tasks"]] == [48, 48]  # 20% of 60 per class, per domain
    assert (
        min(metrics["class_il"]["accuracy_matrix"][-1]) > 0.6
    )  # both domains known at the end (chance 0.25)
    result = incr("train", *settings[:-3], "dataset.n_tasks=3", f"hydra.run.dir={tmp_path / 'bad'}")
    assert (
        result.returncode == 2
        and "has 2 domain folders (a_plain, b_inverted) for dataset.n_tasks=3" in result.stderr
    )
