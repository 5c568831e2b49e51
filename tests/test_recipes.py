"""Each data set brings its training recipe (configs/recipe/): `dataset=X` alone composes X's model, optimizer,
scheduler, epochs, batch size and augmentation; the command line and the experiments still win over it. The
expected values are the sources' (README, "Training recipes"), written out here by hand."""

from __future__ import annotations

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from incr_cli.config import check_config, check_recipe, config_dir

SGD, ADAM = "torch.optim.SGD", "torch.optim.Adam"
MLP = "incr_cli.models.mlp.MLP"
RESNET18, RESNET32 = "incr_cli.models.resnet.ResNet18", "incr_cli.models.resnet.ResNet32"
MULTISTEP = "torch.optim.lr_scheduler.MultiStepLR"
IMAGENET_STEM = {"width": 64, "stem": "imagenet"}

# dataset: (model target, model values, (lr, momentum, weight decay), scheduler, epochs, batch, (crop, flip))
RECIPES = {
    # the default stream, unchanged: the tests and the documented figures depend on it
    "digits": (MLP, {"hidden_sizes": [256, 256]}, (0.05, 0.9, 0.0), None, 10, 32, (0, False)),
    # DER paper (Mammoth): MNISTMLP 100-100; best_args seq-mnist sgd lr 0.03 batch 10 1 epoch; perm/rot lr 0.2
    # batch 128 1 epoch; momentum and weight decay 0 (utils/args.py)
    "mnist": (MLP, {"hidden_sizes": [100, 100]}, (0.03, 0.0, 0.0), None, 1, 10, (0, False)),
    "fashion_mnist": (MLP, {"hidden_sizes": [100, 100]}, (0.03, 0.0, 0.0), None, 1, 10, (0, False)),
    "permuted_mnist": (MLP, {"hidden_sizes": [100, 100]}, (0.2, 0.0, 0.0), None, 1, 128, (0, False)),
    "rotated_mnist": (MLP, {"hidden_sizes": [100, 100]}, (0.2, 0.0, 0.0), None, 1, 128, (0, False)),
    # DER paper, Seq-CIFAR-10: ResNet-18 width 64, 50 epochs, batch 32, lr 0.1 (sgd and er rows)
    "cifar10": (RESNET18, {"width": 64}, (0.1, 0.0, 0.0), None, 50, 32, (4, True)),
    # PyCIL: ResNet-32, batch 128, first-task schedule 200 epochs, lr 0.1 x0.1 at 60/120/170, wd 5e-4
    "cifar100": (RESNET32, {"width": 16}, (0.1, 0.9, 0.0005), ([60, 120, 170], 0.1), 200, 128, (4, True)),
    "image_folder": (RESNET18, {"width": 64}, (0.01, 0.9, 0.0), None, 20, 32, (4, True)),
    "synthetic": (MLP, {"hidden_sizes": [256, 256]}, (0.05, 0.9, 0.0), None, 10, 32, (4, True)),
    # PODNet's ImageNet configs: lr 0.05, weight decay 1e-4, batch 64, 90 epochs, cosine schedule
    "imagenet": (RESNET18, IMAGENET_STEM, (0.05, 0.9, 0.0001), "cosine", 90, 64, (0, True)),
    "imagenet_subset": (RESNET18, IMAGENET_STEM, (0.05, 0.9, 0.0005), "cosine", 90, 64, (0, True)),
    # DER paper, Seq-TinyImg (Mammoth): ResNet-18, 100 epochs, batch 32, lr 0.03, crop 4 + flip
    "tiny_imagenet": (RESNET18, {"width": 64}, (0.03, 0.0, 0.0), None, 100, 32, (4, True)),
    "core50": (RESNET18, IMAGENET_STEM, (0.01, 0.9, 0.0), None, 10, 64, (0, True)),
    "core50_ni": (RESNET18, IMAGENET_STEM, (0.01, 0.9, 0.0), None, 10, 64, (0, True)),
}
LISTS_FOLDERS = (
    "image_folder",
    "imagenet",
    "imagenet_subset",
    "tiny_imagenet",
    "core50",
    "core50_ni",
)  # their checks list files a test has not


def test_every_data_set_has_a_recipe_of_its_name():
    datasets = {path.stem for path in (config_dir() / "dataset").glob("*.yaml")}
    recipes = {path.stem for path in (config_dir() / "recipe").glob("*.yaml")}
    assert datasets == recipes == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_choosing_a_data_set_composes_its_recipe(name):
    target, model, (lr, momentum, weight_decay), scheduler, epochs, batch, (crop, flip) = RECIPES[name]
    cfg = compose_config([f"dataset={name}"])
    assert cfg.dataset.name == name.removeprefix("permuted_").removeprefix("rotated_")  # MNIST under domains
    assert OmegaConf.to_container(cfg.model) == {"_target_": target, **model}
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_target_": SGD,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
    }
    if scheduler is None:
        assert cfg.scheduler is None
    elif scheduler == "cosine":
        assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    else:
        assert cfg.scheduler._target_ == MULTISTEP
        assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma) == scheduler
    assert (cfg.epochs, cfg.batch_size) == (epochs, batch)
    assert (cfg.dataset.augment.crop_padding, cfg.dataset.augment.horizontal_flip) == (crop, flip)
    if name in LISTS_FOLDERS:
        check_recipe(cfg)
    else:
        check_config(cfg, check_data=False)


def test_the_default_run_is_the_digits_recipe():
    default, digits = compose_config([]), compose_config(["dataset=digits"])
    assert OmegaConf.to_container(default) == OmegaConf.to_container(digits)


def test_the_command_line_wins_over_the_recipe():
    cfg = compose_config(["dataset=cifar10", "model=mlp", "optimizer.lr=0.3", "epochs=2"])
    assert OmegaConf.to_container(cfg.model) == {"_target_": MLP, "hidden_sizes": [256, 256]}
    assert cfg.optimizer.lr == 0.3 and cfg.optimizer.momentum == 0.0  # the recipe's momentum stays
    assert (cfg.epochs, cfg.batch_size) == (2, 32)
    cfg = compose_config(["dataset=cifar100", "batch_size=64", "scheduler=cosine", "model=resnet18"])
    assert cfg.batch_size == 64 and cfg.model._target_ == RESNET18 and "milestones" not in cfg.scheduler


def test_another_optimizer_takes_its_own_values_not_the_recipes():
    cfg = compose_config(["dataset=cifar10", "optimizer=adam"])
    assert OmegaConf.to_container(cfg.optimizer) == {
        "_target_": ADAM,
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
    }
    check_config(cfg, check_data=False)


def test_recipe_chooses_another_data_sets_recipe():
    cfg = compose_config(["dataset=image_folder", "recipe=digits"])
    assert cfg.model._target_ == MLP and (cfg.optimizer.lr, cfg.epochs, cfg.batch_size) == (0.05, 10, 32)
    assert cfg.dataset.name == "image_folder"


def test_a_debug_overlay_shortens_the_recipe():
    cfg = compose_config(["dataset=cifar10", "debug=quick"])
    assert (cfg.epochs, cfg.model._target_) == (1, RESNET18)


# experiment: what it composed to before the recipes existed (each states only what differs from its recipe):
# (model target, hidden sizes or width), (optimizer target, lr, momentum, weight decay), scheduler, epochs, batch,
# crop padding
EXPERIMENTS = {
    "split_fashion_mnist": ((MLP, [400, 400]), (SGD, 0.01, 0.9, 0.0), None, 2, 128, 0),
    "vandeven_split_mnist/base": ((MLP, [400, 400]), (ADAM, 0.001, None, 0.0), None, 21, 128, 0),
    "der_seq_cifar10/finetune": ((RESNET18, 64), (SGD, 0.1, 0.0, 0.0), None, 50, 32, 4),
    "der_seq_cifar10/icarl_200": ((RESNET18, 64), (SGD, 0.1, 0.0, 0.00002), None, 50, 32, 4),
    "xder_seq_cifar100/base": ((RESNET18, 64), (SGD, 0.03, 0.0, 0.0), ([35, 45], 0.1), 50, 32, 4),
    "pycil_cifar100/base": ((RESNET32, 16), (SGD, 0.1, 0.9, 0.0002), None, 170, 128, 4),
    "pycil_cifar100/icarl_b0": ((RESNET32, 16), (SGD, 0.1, 0.9, 0.0002), ([80, 120], 0.1), 170, 128, 4),
    "pycil_cifar100/podnet_b50": ((RESNET32, 16), (SGD, 0.1, 0.9, 0.0005), "cosine", 160, 128, 4),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiments_compose_to_their_frozen_values(name):
    (target, size), (optimizer, lr, momentum, weight_decay), scheduler, epochs, batch, crop = EXPERIMENTS[
        name
    ]
    cfg = compose_config([f"experiment={name}"])
    assert cfg.model._target_ == target
    assert (list(cfg.model.hidden_sizes) if target == MLP else cfg.model.width) == size
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (
        optimizer,
        lr,
        weight_decay,
    )
    assert cfg.optimizer.get("momentum") == momentum  # Adam has none: no SGD key may leak into it
    if scheduler is None:
        assert cfg.scheduler is None
    elif scheduler == "cosine":
        assert cfg.scheduler._target_.endswith("CosineAnnealingLR") and cfg.scheduler.T_max == epochs
    else:
        assert cfg.scheduler._target_ == MULTISTEP
        assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma) == scheduler
    assert (cfg.epochs, cfg.batch_size, cfg.dataset.augment.crop_padding) == (epochs, batch, crop)


def test_the_cifar100_experiments_keep_their_references_normalisation():
    # PyCIL (utils/data.py iCIFAR100) and Mammoth (seq_cifar100.py) share it; the cifar100 data set now holds it
    for name in ("pycil_cifar100/base", "xder_seq_cifar100/base", None):
        cfg = compose_config([f"experiment={name}"] if name else ["dataset=cifar100"])
        assert list(cfg.dataset.mean) == [0.5071, 0.4867, 0.4408]
        assert list(cfg.dataset.std) == [0.2675, 0.2565, 0.2761]
