"""GEM and A-GEM: the projections computed by hand, an update that does not raise the memory loss of a real
model, GEM remembering what fine-tuning forgets, mixed precision and exact resume."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_resumes_exactly, compose_config, final_accuracy, run_experiment

from incr_cli import faults
from incr_cli.cli import main
from incr_cli.data.batches import Batch
from incr_cli.engine import Run
from incr_cli.step import Hardware, StepRunner
from incr_cli.strategies.agem import agem_projection
from incr_cli.strategies.base import Strategy
from incr_cli.strategies.common import gradients
from incr_cli.strategies.gem import gem_projection


def vector(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- A-GEM's maths
def test_agem_removes_the_component_against_the_reference_gradient():
    # <g, g_ref> = -2 and <g_ref, g_ref> = 4: g - (-2 / 4) g_ref = (1, -1) + (0, 1).
    assert torch.equal(agem_projection(vector(1, -1), vector(0, 2)), vector(1, 0))


def test_agem_keeps_a_gradient_that_agrees_with_the_reference():
    g = vector(1, 1)
    assert agem_projection(g, vector(0, 2)) is g
    assert agem_projection(g, vector(-1, 1)) is g  # orthogonal: no increase to first order


def test_agem_update_never_increases_the_memory_loss_to_first_order():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        g, reference = torch.randn(2, 10, generator=generator, dtype=torch.float64)
        projected = agem_projection(g, reference)
        assert projected @ reference >= -1e-12
        if g @ reference < 0:  # the closest such vector: only the component along g_ref changes
            assert torch.allclose(projected @ reference, torch.tensor(0.0, dtype=torch.float64), atol=1e-12)
            residual = g - projected
            assert torch.allclose(residual, (residual @ reference) / (reference @ reference) * reference)


# ------------------------------------------------------------------------------------------------- GEM's maths
def test_gem_keeps_a_gradient_that_violates_no_constraint():
    g = vector(1, 2)
    assert gem_projection(g, torch.stack([vector(1, 0), vector(0, 1), vector(-2, 1)]), margin=0.5) is g


def test_gem_solves_a_two_dimensional_qp_by_hand():
    # Constraints z1 >= 0 and z1 + z2 >= 0, proposed g = (-1, -2). The dual, 1/2 v^T [[1, 1], [1, 2]] v
    # + (-1, -3) . v over v >= 0, is solved by v = (0, 3/2) (the first constraint is inactive: its partial
    # derivative there is 0 + 3/2 - 1 > 0), so g~ = g + 3/2 (1, 1) = (1/2, -1/2): the projection of g onto
    # the line z1 + z2 = 0, which also satisfies z1 >= 0.
    memory = torch.stack([vector(1, 0), vector(1, 1)])
    g = vector(-1, -2)
    assert torch.allclose(gem_projection(g, memory, margin=0.0, ridge=0.0), vector(0.5, -0.5))
    # Memory strength 1/2: v1 >= 1/2 is now active, and d/dv2 = v1 + 2 v2 - 3 = 0 gives v2 = 5/4, so
    # g~ = g + 1/2 (1, 0) + 5/4 (1, 1) = (3/4, -3/4): pushed towards the first task's gradient.
    assert torch.allclose(gem_projection(g, memory, margin=0.5, ridge=0.0), vector(0.75, -0.75))


def test_gem_with_one_task_and_no_margin_is_the_agem_projection():
    g, reference = vector(3, -1, 2), vector(-1, 2, 0)
    assert torch.allclose(
        gem_projection(g, reference[None], margin=0.0, ridge=0.0), agem_projection(g, reference)
    )


def test_gem_update_never_increases_a_past_task_loss_to_first_order():
    generator = torch.Generator().manual_seed(0)
    for tasks in (1, 2, 4, 8):
        for _ in range(25):
            memory = torch.randn(tasks, 50, generator=generator, dtype=torch.float64)
            g = torch.randn(50, generator=generator, dtype=torch.float64)
            for margin in (0.0, 0.5):
                projected = gem_projection(g, memory, margin=margin)
                # The ridge lets G g~ fall below 0 by ridge * v (KKT): a tolerance of that size.
                assert (memory @ projected >= -1e-2).all()
                assert (memory @ gem_projection(g, memory, margin=margin, ridge=0.0) >= -1e-9).all()


def test_gem_projection_is_unchanged_by_a_common_loss_scale():
    """GradScaler multiplies g and every g_k by the same s: the dual's solution (margin included) is the
    same, and the update comes out multiplied by s."""
    memory = torch.stack([vector(1, 0, 2), vector(1, 1, -1)])
    g = vector(-1, -2, -1)
    expected = gem_projection(g, memory, margin=0.5, ridge=0.0)
    scaled = gem_projection(g * 1024, memory * 1024, margin=0.5, ridge=0.0)
    assert torch.allclose(scaled / 1024, expected)


def test_gradient_vectors_round_trip_through_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0](torch.ones(4, 3)).sum().backward()  # the second layer gets no gradient
    parameters = gradients.trainable(model)
    flat = gradients.flatten(parameters)
    assert flat.shape == (3 * 2 + 2 + 2 + 1,)
    assert torch.equal(flat[:6], model[0].weight.grad.reshape(-1)) and not flat[8:].any()
    gradients.write(parameters, torch.arange(11.0))
    assert torch.equal(model[1].weight.grad, torch.tensor([[8.0, 9.0]]))
    assert torch.equal(gradients.flatten(parameters), torch.arange(11.0))


# ---------------------------------------------------------------------------------------- on a real model
def into_the_third_task(run_dir: Path, strategy: str) -> tuple[Run, Batch]:
    """The digits run of `strategy` (2 epochs of 9 steps per task) stopped by SIGTERM after step 40, four
    steps into the third task, rebuilt from its checkpoint; and a batch of the third task."""
    settings = [f"strategy={strategy}", "epochs=2", "hardware=cpu", "progress=false"]
    os.environ["INCR_FAULT"] = "step:40:SIGTERM"
    try:
        with pytest.raises(SystemExit):
            main(["train", f"hydra.run.dir={run_dir}", *settings])
    finally:
        del os.environ["INCR_FAULT"]
        faults._counts.clear()
    run = Run(
        compose_config([*settings, "resume=true"]),
        run_dir,
        {"strategy": strategy, "dataset": "digits", "model": "mlp"},
    )
    task = run.stream.tasks[run.position.task]
    assert task.id == 2 and run.position.started and run.strategy.memory_samples == 2 * 100
    rows = task.train_index[:32]
    return run, Batch(run.stream.train_x[rows], run.stream.train_y[rows])


def memory_losses(run: Run) -> torch.Tensor:
    """Cross-entropy over the classes seen so far on each past task's memory (A-GEM: on the whole memory)."""
    strategy = run.strategy
    xs = strategy.memory_x if isinstance(strategy.memory_x, list) else [strategy.memory_x]
    ys = strategy.memory_y if isinstance(strategy.memory_y, list) else [strategy.memory_y]
    with torch.no_grad():
        return torch.stack(
            [
                torch.nn.functional.cross_entropy(run.model(run.preprocess(x)), y)
                for x, y in zip(xs, ys, strict=True)
            ]
        )


def change_after_one_step(run: Run, batch: Batch, step, lr: float) -> torch.Tensor:
    """How one plain-SGD step taken by `step` changes the memory losses; the model is put back after."""
    saved = copy.deepcopy(run.model.state_dict())
    before = memory_losses(run)
    optimizer = torch.optim.SGD(run.model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step(batch, StepRunner(optimizer, scaler, Hardware(torch.device("cpu"), None), "stop", lambda: "test"))
    change = memory_losses(run) - before
    run.model.load_state_dict(saved)
    return change


@pytest.mark.parametrize("strategy", ["agem", "gem"])
def test_one_step_does_not_raise_the_memory_loss_that_finetuning_raises(tmp_path, strategy):
    """With the real model and memory a few steps into the third digits task, one SGD step from the same
    batch: plain fine-tuning raises a past task's memory loss (to first order in the step size), the
    projected step raises none of them beyond second order (under a twentieth of that, at this step size)."""
    run, batch = into_the_third_task(tmp_path, strategy)
    lr = 1e-3
    finetune = change_after_one_step(run, batch, lambda b, o: Strategy.training_step(run.strategy, b, o), lr)
    projected = change_after_one_step(run, batch, run.strategy.training_step, lr)
    assert finetune.max() > 0
    assert (projected <= 0.05 * finetune.max()).all(), (finetune, projected)


def test_gem_remembers_what_finetune_forgets_on_digits(tmp_path):
    finetune = run_experiment(tmp_path / "ft", ["strategy=finetune", "epochs=3"])
    gem = run_experiment(tmp_path / "gem", ["strategy=gem", "epochs=3"])
    assert final_accuracy(gem) >= final_accuracy(finetune) + 0.5
    assert gem["per_task"][-1]["memory_samples"] == 5 * 100


@pytest.mark.parametrize("strategy", ["gem", "agem"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float16 adds the GradScaler
def test_mixed_precision_runs_end_to_end(tmp_path, strategy, dtype):
    metrics = run_experiment(
        tmp_path,
        [
            f"strategy={strategy}",
            "epochs=1",
            "hardware=amp",
            f"hardware.amp_dtype={dtype}",
            "dataset.n_tasks=2",
        ],
    )
    assert metrics["run"]["status"] == "finished"
    assert 0.0 < final_accuracy(metrics) <= 1.0


@pytest.mark.parametrize("strategy", ["gem", "agem"])
def test_resumes_exactly(tmp_path, strategy):
    """Stopped at step 35 of 2 epochs x 9 batches per task, one step before task 2 ends, and resumed: the
    memory of task 1, the random generator's state (A-GEM's samples) and GEM's memory-to-be (the last
    samples seen, mostly before the stop) must all come back through the checkpoint."""
    assert_resumes_exactly(tmp_path, [f"strategy={strategy}", "epochs=2"], fault="step:35:SIGTERM")
