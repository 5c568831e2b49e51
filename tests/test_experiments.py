"""The published protocols in configs/experiment: every file composes and passes the checks that run before
training (all but the data's presence: CIFAR and MNIST are not on the test machine), and the values that
make each protocol the paper's are pinned here against their sources (docs/reproducibility.md)."""

from __future__ import annotations

import math
import re
from functools import cache

import pytest
import yaml
from conftest import compose_config
from omegaconf import DictConfig

from incr_cli.config import check_config, config_dir
from incr_cli.data.stream import resolve_class_order, task_sizes

EXPERIMENTS = config_dir() / "experiment"
NAMES = sorted(str(path.relative_to(EXPERIMENTS).with_suffix("")) for path in EXPERIMENTS.rglob("*.yaml"))

# MNIST's training split, images per digit 0..9.
MNIST_TRAIN_PER_DIGIT = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def chosen_strategy(name: str) -> str | None:
    """The strategy an experiment selects, following its defaults list into the configs it builds on."""
    defaults = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text()).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, dict) and "override /strategy" in entry:
            return entry["override /strategy"]
    parents = [
        entry for entry in defaults if isinstance(entry, str) and (EXPERIMENTS / f"{entry}.yaml").is_file()
    ]
    return chosen_strategy(parents[0]) if parents else None


@cache
def composed(name: str) -> DictConfig:
    strategy = chosen_strategy(name)
    if strategy is not None and not (config_dir() / "strategy" / f"{strategy}.yaml").is_file():
        pytest.skip(f"experiment={name} needs strategy={strategy}, which has no config yet")
    return compose_config([f"experiment={name}"])


def test_every_paper_protocol_is_here():
    for group in (
        "der_seq_cifar10",
        "xder_seq_cifar100",
        "pycil_cifar100",
        "vandeven_split_mnist",
        "imagenet100_b50",
    ):
        assert f"{group}/base" in NAMES
        assert len([name for name in NAMES if name.startswith(f"{group}/")]) > 4


@pytest.mark.parametrize("name", NAMES)
def test_experiment_composes_and_passes_the_checks(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    assert re.search(rf"^# incr train experiment={name}( |$)", text, re.MULTILINE), "the line that runs it"
    check_config(composed(name), check_data=False)


def test_der_paper_derpp_row_is_its_buffer_500_setting():
    cfg = composed("der_seq_cifar10/derpp_500")
    assert cfg.dataset.name == "cifar10" and cfg.dataset.n_tasks == 5
    assert resolve_class_order(cfg.dataset) == list(range(10))
    assert cfg.model._target_.endswith("ResNet18") and cfg.model.width == 64
    assert (cfg.epochs, cfg.batch_size, cfg.strategy.replay_batch_size) == (50, 32, 32)
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.scheduler is None
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.03, 0.0, 0.0)
    assert (cfg.strategy.alpha, cfg.strategy.beta) == (0.2, 0.5)
    assert (cfg.strategy.memory.size, cfg.strategy.memory.selection) == (500, "reservoir")


# Mammoth utils/best_args.py, best_args['seq-cifar10']: the learning rate of every row.
DER_PAPER_LR = {
    "finetune": 0.1,
    "online_ewc": 0.03,
    "si": 0.03,
    "lwf": 0.01,
    "replay_200": 0.1,
    "replay_500": 0.1,
    "replay_5120": 0.1,
    "der_200": 0.03,
    "der_500": 0.03,
    "der_5120": 0.03,
    "derpp_200": 0.03,
    "derpp_500": 0.03,
    "derpp_5120": 0.03,
    "agem_200": 0.03,
    "agem_500": 0.03,
    "agem_5120": 0.03,
    "gem_200": 0.03,
    "gem_500": 0.03,
    "gem_5120": 0.03,
    "icarl_200": 0.1,
    "icarl_500": 0.1,
    "icarl_5120": 0.03,
}


@pytest.mark.parametrize("row", sorted(DER_PAPER_LR))
def test_der_paper_rows_have_their_learning_rate_and_buffer(row):
    cfg = composed(f"der_seq_cifar10/{row}")
    assert cfg.optimizer.lr == DER_PAPER_LR[row]
    assert (cfg.epochs, cfg.batch_size) == (50, 32)
    buffer = row.rpartition("_")[2]
    if buffer.isdigit():
        kept = cfg.strategy.memory.size if "memory" in cfg.strategy else cfg.strategy.patterns_per_task * 5
        assert kept == int(buffer)


def test_der_paper_derpp_weights_follow_the_buffer():
    weights = {size: composed(f"der_seq_cifar10/derpp_{size}").strategy for size in (200, 500, 5120)}
    assert {size: (s.alpha, s.beta) for size, s in weights.items()} == {
        200: (0.1, 0.5),
        500: (0.2, 0.5),
        5120: (0.1, 1.0),
    }


def test_xder_paper_protocol():
    cfg = composed("xder_seq_cifar100/xder_500")
    assert cfg.dataset.name == "cifar100" and cfg.dataset.n_tasks == 10
    assert resolve_class_order(cfg.dataset) == list(range(100)), (
        "Mammoth's seq-cifar100 keeps the natural order"
    )
    assert (cfg.epochs, cfg.batch_size, cfg.optimizer.lr, cfg.optimizer.momentum) == (50, 32, 0.03, 0.0)
    assert list(cfg.scheduler.milestones) == [35, 45] and cfg.scheduler.gamma == 0.1
    assert (cfg.strategy.alpha, cfg.strategy.beta, cfg.strategy.gamma) == (0.3, 0.8, 0.85)
    assert (cfg.strategy.memory.size, cfg.strategy.memory.selection) == (500, "class_balanced")
    assert composed("xder_seq_cifar100/replay_500").optimizer.lr == 0.1
    derpp = composed("xder_seq_cifar100/derpp_500")
    assert (derpp.optimizer.lr, derpp.strategy.alpha, derpp.strategy.beta) == (0.03, 0.1, 0.5)


def pycil_order() -> list[int]:
    """PyCIL's class order for CIFAR-100 (utils/data_manager.py: np.random.seed(1993), then a permutation)."""
    np = pytest.importorskip("numpy")
    np.random.seed(1993)
    return np.random.permutation(100).tolist()


def test_pycil_protocol_has_pycils_class_order_which_incrs_seed_1993_does_not_give():
    base = composed("pycil_cifar100/base")
    assert resolve_class_order(base.dataset) == pycil_order()
    # incr's cifar100 default, class_order_seed 1993, draws with torch: another order than PyCIL's.
    assert resolve_class_order(compose_config(["dataset=cifar100"]).dataset) != pycil_order()


def test_pycil_b50_rows_learn_50_classes_then_five_tasks_of_10():
    cfg = composed("pycil_cifar100/wa_b50")
    assert task_sizes(cfg.dataset) == [50, 10, 10, 10, 10, 10]
    assert task_sizes(composed("pycil_cifar100/wa_b0").dataset) == [10] * 10
    assert cfg.model._target_.endswith("ResNet32") and (cfg.epochs, cfg.batch_size) == (170, 128)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.1, 0.9, 0.0002)
    assert list(cfg.scheduler.milestones) == [60, 100, 140]
    assert (cfg.strategy.memory.size, cfg.strategy.memory.selection) == (2000, "herding")


def test_van_de_ven_split_mnist_protocol():
    cfg = composed("vandeven_split_mnist/replay")
    assert cfg.model.hidden_sizes == [400, 400] and cfg.dataset.normalize is False
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.001
    assert list(cfg.optimizer.betas) == [0.9, 0.999] and cfg.batch_size == 128
    assert cfg.strategy.memory.size == 1000  # their budget: 100 per class, 10 classes at the end
    # The digits are shuffled into tasks by the seed, as in their code.
    other_seed = cfg.copy()
    other_seed.seed = cfg.seed + 1
    assert resolve_class_order(cfg.dataset) != resolve_class_order(other_seed.dataset)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_van_de_ven_epochs_come_closest_to_2000_iterations_per_task(seed):
    """Their 2,000 iterations per task become the epoch count whose steps over the 5 tasks come closest to
    10,000, counted with MNIST's images per digit and this seed's digit pairing (the last batch is partial)."""
    cfg = composed("vandeven_split_mnist/finetune").copy()
    cfg.seed = seed
    order = resolve_class_order(cfg.dataset)
    images = [sum(MNIST_TRAIN_PER_DIGIT[digit] for digit in order[2 * t : 2 * t + 2]) for t in range(5)]
    batches = sum(math.ceil(n / cfg.batch_size) for n in images)
    assert cfg.epochs == min(range(1, 60), key=lambda epochs: abs(epochs * batches - 5 * 2000)) == 21
    assert abs(cfg.epochs * batches - 10_000) / 10_000 < 0.02


def test_protocol_files_name_their_source_and_what_they_reproduce():
    for name in NAMES:
        if "/" not in name or name.endswith("/base"):
            continue
        header = (EXPERIMENTS / f"{name}.yaml").read_text().split("defaults:")[0]
        assert "# Reproduces:" in header and "Hyper-parameters:" in header, name


def numpy_seed_1993_order(n: int) -> list[int]:
    """The class order of LUCIR's and PODNet's ImageNet runs: numpy's legacy generator, seed 1993, shuffling 0..n-1."""
    import numpy as np

    np.random.seed(1993)
    order = np.arange(n)
    np.random.shuffle(order)
    return order.tolist()


@pytest.mark.parametrize("steps", [5, 10])
def test_imagenet100_b50_rows_are_the_authors_settings(steps):
    for method, subset in (("lucir", "lucir"), ("podnet", "podnet")):
        cfg = composed(f"imagenet100_b50/{method}_{steps}steps")
        dataset = cfg.dataset
        assert (dataset.name, dataset.subset, dataset.num_classes) == ("imagenet_subset", subset, 100)
        assert task_sizes(dataset) == [50] + [50 // steps] * steps
        assert resolve_class_order(dataset) == numpy_seed_1993_order(100)
        assert (dataset.crop_size, dataset.augment.random_resized_crop, cfg.model.stem) == (
            224,
            True,
            "imagenet",
        )
        assert (cfg.strategy.memory.size, cfg.strategy.memory.selection, cfg.epochs) == (2000, "herding", 90)
    lucir = composed(f"imagenet100_b50/lucir_{steps}steps")
    assert (lucir.optimizer.lr, lucir.optimizer.weight_decay, lucir.batch_size) == (0.1, 1e-4, 128)
    assert list(lucir.scheduler.milestones) == [30, 60] and lucir.strategy.lambda_base == 10.0
    podnet = composed(f"imagenet100_b50/podnet_{steps}steps")
    assert (podnet.optimizer.lr, podnet.optimizer.weight_decay, podnet.batch_size) == (0.05, 5e-4, 64)
    assert (podnet.strategy.lambda_flat, podnet.strategy.lambda_spatial) == (10.0, 8.0)
    assert (podnet.strategy.finetune_epochs, podnet.strategy.finetune_lr) == (20, 0.01)


def test_imagenet1k_b500_is_podnets_run_in_its_class_order():
    cfg = composed("imagenet1k_b500/podnet_10steps")
    assert task_sizes(cfg.dataset) == [500] + [50] * 10
    assert resolve_class_order(cfg.dataset) == numpy_seed_1993_order(1000)
    assert (cfg.optimizer.weight_decay, cfg.strategy.memory.size) == (1e-4, 20000)


def test_mammoth_seq_tinyimagenet_rows():
    base = composed("mammoth_seq_tinyimg/base")
    assert task_sizes(base.dataset) == [20] * 10 and resolve_class_order(base.dataset) == list(range(200))
    assert (base.epochs, base.batch_size, base.optimizer.momentum, base.scheduler) == (100, 32, 0.0, None)
    derpp = composed("mammoth_seq_tinyimg/derpp_500").strategy
    assert (derpp.alpha, derpp.beta, derpp.memory.size) == (0.2, 0.5, 500)
    der = composed("mammoth_seq_tinyimg/der_500").strategy
    assert (der.alpha, der.beta, der.memory.size) == (0.1, 0.0, 500)


def test_core50_nc_is_the_papers_split():
    cfg = composed("core50_nc/replay")
    assert task_sizes(cfg.dataset) == [10] + [5] * 8
