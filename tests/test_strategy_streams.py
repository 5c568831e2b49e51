"""Every strategy config, as shipped, on the other built-in streams: permuted and rotated digits (domain-IL, 5 tasks,
1 epoch), where a strategy not made for domain-IL must refuse with the one-line config error, and Split
Fashion-MNIST with its protocol's settings. (The digits sweep is tests/test_strategy_defaults.py; two files so
that the two test workers share the sweep.)"""

from __future__ import annotations

import pytest
from conftest import needs_fashion_mnist
from test_strategy_defaults import STRATEGIES, assert_trained_finite, strategy_class, train

pytestmark = pytest.mark.slow  # 75 runs, about 4 CPU minutes: run with `-m slow`, and in CI

DOMAINS = ["dataset.scenario=domain_il", "dataset.n_tasks=5"]
# EWC's default expected Fisher differentiates every class of every sample (10 backward passes a sample); the
# digits sweep runs it as shipped, here the true label's gradient alone keeps the estimator's code path.
TRUE_LABEL_FISHER = {name: ["strategy.fisher_labels=empirical"] for name in ("ewc", "online_ewc")}


@pytest.mark.parametrize("domains", ["permuted", "rotated"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_domain_il_digits(tmp_path, capsys, strategy, domains):
    overrides = [*DOMAINS, f"dataset.domains={domains}", "epochs=1", *TRUE_LABEL_FISHER.get(strategy, [])]
    status = train(tmp_path, strategy, overrides)
    if "domain_il" in strategy_class(strategy).scenarios:
        assert status == 0
        assert_trained_finite(tmp_path)
    else:  # refused before training: exit status 2 and one line naming the scenario, no traceback
        captured = capsys.readouterr()
        message = (captured.err + captured.out).strip()
        assert status == 2
        assert len(message.splitlines()) == 1 and "domain_il" in message, message
        assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Fashion-MNIST is read from Debian's folder; data.root only receives the decoded-tensor cache."""
    return tmp_path_factory.mktemp("fashion-data")


@needs_fashion_mnist
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fashion_mnist(tmp_path, data_root, strategy):
    # The protocol's settings (lr 0.01, batch 128, 2 epochs per task) on a tenth of the training images: the
    # held-out 90% (dataset.val_fraction) is never trained on, and evaluation is on the whole test set.
    overrides = [
        "experiment=split_fashion_mnist",
        "dataset.val_fraction=0.9",
        f"data.root={data_root}",
        *TRUE_LABEL_FISHER.get(strategy, []),
    ]
    assert train(tmp_path, strategy, overrides) == 0
    assert_trained_finite(tmp_path)
