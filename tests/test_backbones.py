"""What a backbone offers the strategies (incr_cli.models.backbone.Backbone): every built-in backbone's
embedding size, embedding before its last activation and stages; a backbone defined here, and nowhere in
incr, trains with LUCIR and PODNet; a backbone without what a method needs is refused before training."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_context, run_experiment
from omegaconf import OmegaConf
from torch import Tensor, nn

from incr_cli.data.stream import Stream
from incr_cli.errors import ConfigError
from incr_cli.memory import Memory
from incr_cli.models.convnet import CifarCNN, ConvNet
from incr_cli.models.head import IncrementalNet
from incr_cli.models.mlp import MLP
from incr_cli.models.resnet import ResNet18, ResNet32
from incr_cli.strategies.lucir import LUCIR
from incr_cli.strategies.podnet import PODNet


class TwoStageNet(nn.Module):
    """A backbone incr does not ship: two strided conv stages, average pooling and a linear layer, ending in a
    GELU (which, unlike a ReLU, lets small negative values through)."""

    def __init__(self, input_shape: tuple[int, int, int], width: int = 4):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 2, 1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU())
        self.linear = nn.Linear(2 * width, 2 * width)
        self.activation = nn.GELU()
        self.feature_dim = 2 * width

    def embedding_before_activation(self, x: Tensor) -> Tensor:
        return self.linear(self.second(self.first(x)).mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.embedding_before_activation(x))

    def stage_modules(self) -> list[nn.Module]:
        return [self.first, self.second]


TINY = [
    "model._target_=test_backbones.TwoStageNet",
    "~model.hidden_sizes",
    "+model.width=4",
    "dataset.n_tasks=2",
    "epochs=1",
    "strategy.memory.size=20",
    "strategy.finetune_epochs=1",
    "hardware=cpu",
]


@pytest.mark.parametrize("strategy", ["lucir", "podnet"])
def test_a_new_backbone_trains_with_the_cosine_methods(tmp_path, strategy):
    # Two tasks of the digits stream, one epoch each and one epoch of class-balanced finetuning: the method
    # takes the new backbone's embedding and stages without knowing its class.
    metrics = run_experiment(tmp_path, [f"strategy={strategy}", *TINY])
    assert metrics["run"]["status"] == "finished"
    assert len(metrics["class_il"]["accuracy_matrix"]) == 2


class NoProtocol(nn.Module):
    """Features, but nothing else a cosine method needs."""

    feature_dim = 4

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def setup_on(strategy, backbone: nn.Module) -> None:
    empty = torch.zeros(0, dtype=torch.long)
    stream = Stream(empty, empty, empty, empty, [], [0, 1], ["0", "1"], max_value=1)
    dataset = OmegaConf.create(
        {
            "input_shape": [4, 1, 1],
            "normalize": False,
            "mean": [0.0],
            "std": [1.0],
            "augment": {"crop_padding": 0, "horizontal_flip": False, "rotation_degrees": 0.0},
        }
    )
    strategy.setup(
        cpu_context(
            IncrementalNet(backbone, 2), stream, dataset, optimizer=torch.optim.SGD, rng=torch.Generator()
        )
    )


def test_a_backbone_without_what_the_method_needs_is_refused_at_setup():
    with pytest.raises(ConfigError, match="NoProtocol lacks embedding_before_activation, which LUCIR needs"):
        setup_on(LUCIR(Memory(size=0)), NoProtocol())
    NoProtocol.embedding_before_activation = NoProtocol.forward
    try:
        setup_on(LUCIR(Memory(size=0)), NoProtocol())  # all that LUCIR needs
        with pytest.raises(ConfigError, match="NoProtocol lacks stage_modules, which PODNet needs") as error:
            setup_on(PODNet(Memory(size=0)), NoProtocol())
    finally:
        del NoProtocol.embedding_before_activation
    assert "\n" not in str(error.value)


# (backbone, input shape, stages): an MLP's hidden layers but the last, a ConvNet's poolings, a ResNet's stages
BUILT_IN = [
    (lambda shape: MLP(shape, [16, 16, 16]), (1, 8, 8), 2),
    (lambda shape: ConvNet(shape, input_size=8, channels=[4, 8], hidden_size=16), (1, 8, 8), 2),
    (lambda shape: CifarCNN(shape, input_size=8, channels=[4, 4, 8, 8], hidden_size=16), (3, 8, 8), 2),
    (lambda shape: ResNet18(shape, width=4), (3, 8, 8), 4),
    (lambda shape: ResNet32(shape, width=4), (3, 8, 8), 3),
]


@pytest.mark.parametrize(
    ("build", "shape", "n_stages"), BUILT_IN, ids=["mlp", "convnet", "cifar_cnn", "resnet18", "resnet32"]
)
def test_every_built_in_backbone_offers_what_the_strategies_need(build, shape, n_stages):
    torch.manual_seed(0)
    backbone = build(shape).eval()
    x = torch.randn(16, *shape)
    stages = backbone.stage_modules()
    outputs = []
    hooks = [stage.register_forward_hook(lambda m, i, output: outputs.append(output)) for stage in stages]
    with torch.no_grad():
        features = backbone(x)
        before = backbone.embedding_before_activation(x)
    for hook in hooks:
        hook.remove()
    assert features.shape == before.shape == (16, backbone.feature_dim)
    assert (features >= 0).all() and (before < 0).any()  # the last ReLU, and without it
    assert torch.equal(backbone(x), features)  # taking the embedding leaves `forward` as it was
    assert len(stages) == n_stages
    assert len(outputs) == 2 * n_stages  # each stage ran once per forward pass
    assert all(isinstance(stage, nn.Module) for stage in stages)


def test_imagenet_resnet18_is_torchvisions_resnet18_without_its_classifier():
    """Same layers in the same order: torchvision's weights and batch-norm statistics, copied over one for one,
    give the same features (its average-pooled output before `fc`) on a 64x64 batch; at 224x224 the last
    stage is 7x7, as He et al.'s table 1 has it."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    ours = ResNet18((3, 224, 224), stem="imagenet")
    theirs = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert [tuple(v.shape) for v in ours.state_dict().values()] == [tuple(v.shape) for v in theirs.values()]
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.values(), strict=True)))
    reference.fc = nn.Identity()
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
        assert ours.stages(ours.stem(torch.zeros(1, 3, 224, 224))).shape == (1, 512, 7, 7)
    assert [tuple(m.conv2.weight.shape[:1]) for m in ours.stage_modules()] == [(64,), (128,), (256,), (512,)]


def test_an_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="stem must be one of cifar, imagenet"):
        ResNet18((3, 32, 32), stem="mobile")
