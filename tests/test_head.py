"""The classifier head that grows as classes arrive."""

from __future__ import annotations

import torch

from incr_cli.models.head import IncrementalClassifier, IncrementalNet
from incr_cli.models.mlp import MLP


def head(seed: int = 0, in_features: int = 4, total: int = 10) -> IncrementalClassifier:
    torch.manual_seed(seed)
    return IncrementalClassifier(in_features, total)


def test_a_new_head_scores_no_class_until_it_grows():
    h = head()
    assert h.n_classes == 0
    assert h(torch.randn(3, 4)).shape == (3, 0)
    assert h.forward_all(torch.randn(3, 4)).shape == (3, 10)


def test_grow_keeps_trained_rows_exactly_and_activates_the_pre_drawn_future_rows():
    h = head()
    h.grow(2)
    assert torch.equal(h.weight, h.future_weight[:2]) and torch.equal(h.bias, h.future_bias[:2])
    with torch.no_grad():  # stands for training: the first two rows move away from their initialisation
        h.weight.copy_(torch.arange(8.0).reshape(2, 4))
        h.bias.copy_(torch.tensor([-1.0, 1.0]))
    h.grow(5)
    assert h.n_classes == 5
    assert torch.equal(h.weight[:2], torch.arange(8.0).reshape(2, 4))
    assert torch.equal(h.bias[:2], torch.tensor([-1.0, 1.0]))
    assert torch.equal(h.weight[2:], h.future_weight[2:5]) and torch.equal(h.bias[2:], h.future_bias[2:5])
    assert h.weight.requires_grad and h.bias.requires_grad


def test_grow_never_shrinks():
    h = head()
    h.grow(6)
    weight = h.weight
    h.grow(4)
    assert h.n_classes == 6 and h.weight is weight


def test_forward_scores_seen_classes_and_forward_all_every_class():
    h = head()
    h.grow(4)
    features = torch.randn(5, 4)
    seen, everything = h(features), h.forward_all(features)
    assert seen.shape == (5, 4) and everything.shape == (5, 10)
    assert torch.allclose(everything[:, :4], seen)
    # the future classes are scored by the rows they will start from
    assert torch.allclose(everything[:, 4:], features @ h.future_weight[4:].t() + h.future_bias[4:])
    # a linear layer: logits = features @ W^T + b
    assert torch.allclose(seen, features @ h.weight.t() + h.bias)


def test_load_state_dict_into_a_fresh_head_of_another_size():
    trained = head(seed=0)
    trained.grow(6)
    with torch.no_grad():
        trained.weight.add_(1.0)
    state = trained.state_dict()
    for active in (0, 2, 8):  # fewer and more active classes than the checkpoint
        fresh = head(seed=1)
        fresh.grow(active)
        fresh.load_state_dict(state)
        assert fresh.n_classes == 6
        assert torch.equal(fresh.weight, trained.weight) and torch.equal(fresh.bias, trained.bias)
        assert torch.equal(fresh.future_weight, trained.future_weight)
        features = torch.randn(3, 4)
        assert torch.equal(fresh.forward_all(features), trained.forward_all(features))


def test_the_network_scores_seen_classes_through_its_backbone():
    torch.manual_seed(0)
    net = IncrementalNet(MLP((1, 8, 8), hidden_sizes=[16]), total_classes=10)
    net.head.grow(2)
    x = torch.randn(3, 1, 8, 8)
    assert net(x).shape == (3, 2) and net.forward_all(x).shape == (3, 10)
    assert torch.allclose(net(x), net.head(net.backbone(x)))
    # the grown rows are trained: they are among the network's parameters
    assert any(p is net.head.weight for p in net.parameters())
