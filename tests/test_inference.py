"""Using a trained model: `incr eval` reproduces the run's own figures, `incr predict` labels image files as
the evaluation does, `incr export` writes a model whose outputs are the checkpoint's, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import incr, run_experiment
from omegaconf import OmegaConf
from PIL import Image

from incr_cli import inference
from incr_cli.cli import main
from incr_cli.data.sources import load_source
from incr_cli.strategies.icarl import nearest_mean_scores

TINY = ["dataset=digits", "dataset.n_tasks=2", "epochs=2", "hardware=cpu", "seed=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny digits runs: replay (the default), a growing network (with step checkpoints mid-task), iCaRL's
    nearest-mean classifier, and replay on three permuted domains (domain-IL)."""
    root = tmp_path_factory.mktemp("runs")
    settings = {
        "replay": ["strategy=replay"],
        "der_expandable": ["strategy=der_expandable", "checkpoint.every_steps=25"],
        "icarl": ["strategy=icarl"],
        "domain_il": [
            "strategy=replay",
            "dataset.scenario=domain_il",
            "dataset.domains=permuted",
            "dataset.n_tasks=3",
        ],
    }
    for name, overrides in settings.items():
        run_experiment(root / name, [*TINY, *overrides])
    return {name: root / name for name in settings}


@pytest.fixture(scope="module")
def digits_test():
    """The digits test split in label order (default class order: label = digit), pixels 0..16."""
    source = load_source("digits", OmegaConf.create({"root": "~", "download": False}))
    return source.test_x, source.test_y


def write_pngs(folder: Path, images: torch.Tensor, labels: torch.Tensor, upscale: int = 1) -> list[Path]:
    """8x8 digits (pixels 0..16) as 8-bit PNG files of round(v * 255 / 16), every third one as RGB: predict's
    conversion to grayscale (R = G = B) and its rounding to the 17 training levels give back exactly v.
    With `upscale`, each pixel becomes an upscale x upscale block (predict shrinks it back, bilinear)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = np.round(image[0].numpy().astype(np.float64) * 255 / 16).astype(np.uint8)
        picture = Image.fromarray(pixels, "L")
        if i % 3 == 2:
            picture = picture.convert("RGB")
        if upscale > 1:
            picture = picture.resize((8 * upscale, 8 * upscale), Image.Resampling.NEAREST)
        path = folder / f"{i:04d}_{int(label)}.png"
        picture.save(path)
        paths.append(path)
    return paths


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def predicted_labels(capsys, checkpoint: Path, *images: Path) -> dict[str, int]:
    status, out, err = in_process(
        capsys, "predict", str(checkpoint), *map(str, images), "--json", "--top-k", "1"
    )
    assert status == 0, err
    return {Path(row["image"]).name: int(row["predictions"][0]["class"]) for row in json.loads(out)}


@torch.no_grad()
def checkpoint_scores(loaded: inference.Loaded, images: torch.Tensor) -> torch.Tensor:
    """Scores over the seen classes exactly as the engine's evaluation computes them from stream pixels."""
    return loaded.strategy.predict(loaded.preprocess(images))[:, : loaded.n_seen].float()


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------- predict = eval
def test_predict_on_images_written_from_the_test_set_gives_the_labels_of_eval(
    runs, digits_test, tmp_path, capsys
):
    """The test set written as an image folder (test/<class>/*.png, a few training images beside it):
    `incr predict` on its files and `incr eval dataset=image_folder` on the folder see the same pixels."""
    images, labels = digits_test
    folder = tmp_path / "folder"
    paths = []
    for digit in range(10):
        members = torch.nonzero(labels == digit).flatten()
        paths += write_pngs(folder / "test" / str(digit), images[members], labels[members])
        write_pngs(folder / "train" / str(digit), images[members[:2]], labels[members[:2]])
    predicted = predicted_labels(capsys, runs["replay"], folder / "test")
    assert len(predicted) == len(paths) == len(labels)
    truth = torch.tensor([int(p.parent.name) for p in paths])
    prediction = torch.tensor([predicted[p.name] for p in paths])
    out = tmp_path / "eval.json"
    status, _, err = in_process(
        capsys,
        "eval",
        str(runs["replay"]),
        "dataset=image_folder",
        f"dataset.folder={folder}",
        "dataset.n_tasks=2",
        f"data.root={tmp_path / 'data'}",
        "--out",
        str(out),
    )
    assert status == 0, err
    result = json.loads(out.read_text())
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((truth, prediction), torch.ones_like(truth), accumulate=True)
    assert result["final"]["confusion_matrix"] == confusion.tolist()
    # the folder holds the run's own test set: the run's own last row of accuracies
    assert result["class_il"]["accuracy"] == metrics_of(runs["replay"])["class_il"]["accuracy_matrix"][-1]
    assert 0.5 < (prediction == truth).float().mean() < 1.0  # a trained model, with something to get wrong


def test_predict_gives_the_argmax_the_evaluation_takes_sample_by_sample(runs, digits_test, tmp_path, capsys):
    images, labels = digits_test
    paths = write_pngs(tmp_path / "pngs", images, labels)
    predicted = predicted_labels(capsys, runs["replay"], tmp_path / "pngs")
    loaded = inference.load(runs["replay"])
    expected = checkpoint_scores(loaded, images).argmax(1).tolist()
    assert [predicted[p.name] for p in paths] == expected


# ----------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("strategy", ["replay", "der_expandable", "icarl", "domain_il"])
def test_eval_on_the_runs_own_checkpoint_reproduces_its_metrics_exactly(runs, strategy, tmp_path, capsys):
    out = tmp_path / "eval.json"
    status, stdout, err = in_process(capsys, "eval", str(runs[strategy]), "--out", str(out))
    assert status == 0, err
    assert "class-IL" in stdout and "task-IL" in stdout
    result, expected = json.loads(out.read_text()), metrics_of(runs[strategy])
    for scenario in ("class_il", "task_il"):
        assert result[scenario]["accuracy"] == expected[scenario]["accuracy_matrix"][-1]
        assert result[scenario]["average_accuracy"] == pytest.approx(
            expected[scenario]["average_accuracy"][-1]
        )
    assert result["final"]["f1"] == expected["final"]["f1"]
    assert result["seen_classes"] == 10


def test_eval_of_the_first_tasks_checkpoint_scores_only_its_classes(runs, tmp_path, capsys):
    out = tmp_path / "eval.json"
    checkpoint = runs["replay"] / "checkpoints" / "task_1.pt"
    status, _, err = in_process(capsys, "eval", str(checkpoint), "--out", str(out))
    assert status == 0, err
    result = json.loads(out.read_text())
    assert result["seen_classes"] == 5 and result["seen_tasks"] == 1
    assert result["class_il"]["accuracy"] == metrics_of(runs["replay"])["class_il"]["accuracy_matrix"][0]
    assert result["class_il"]["accuracy"][1] == 0.0  # classes 5..9 cannot be predicted yet


def test_eval_of_an_earlier_domain_il_checkpoint_counts_only_the_domains_trained(runs, tmp_path, capsys):
    """Domain-IL: every task has every class, so the trained tasks come from the checkpoint's position."""
    out = tmp_path / "eval.json"
    status, _, err = in_process(
        capsys, "eval", str(runs["domain_il"] / "checkpoints" / "task_2.pt"), "--out", str(out)
    )
    assert status == 0, err
    result, expected = json.loads(out.read_text()), metrics_of(runs["domain_il"])
    assert result["seen_tasks"] == 2 and result["seen_classes"] == 10
    assert result["class_il"]["accuracy"] == expected["class_il"]["accuracy_matrix"][1]
    assert result["final"]["f1"] == expected["per_task"][1]["f1"]  # the confusion of domains 1 and 2 alone


def test_a_step_checkpoint_in_the_middle_of_a_task_loads_and_predicts(runs, digits_test, tmp_path, capsys):
    """Mid-task, DER's network carries its second extractor and auxiliary classifier; the head covers the
    classes of the task under way."""
    steps = sorted((runs["der_expandable"] / "checkpoints").glob("step_*.pt"))
    assert steps
    loaded = inference.load(steps[-1])
    assert loaded.trained_tasks == 2 and loaded.n_seen == 10 and len(loaded.model.backbone) == 2
    assert hasattr(loaded.model, "auxiliary_head")
    images, labels = digits_test
    paths = write_pngs(tmp_path / "pngs", images[:20], labels[:20])
    predicted = predicted_labels(capsys, steps[-1], *paths)
    assert [predicted[p.name] for p in paths] == checkpoint_scores(loaded, images[:20]).argmax(1).tolist()


def test_eval_overrides_change_the_test_stream_not_the_model(runs, digits_test, tmp_path, capsys):
    """Five tasks instead of the run's two and another batch size: the accuracy over all test samples is
    the same, only split differently."""
    out = tmp_path / "eval.json"
    status, _, err = in_process(
        capsys, "eval", str(runs["replay"]), "dataset.n_tasks=5", "eval_batch_size=7", "--out", str(out)
    )
    assert status == 0, err
    result = json.loads(out.read_text())
    five = result["class_il"]["accuracy"]
    two = metrics_of(runs["replay"])["class_il"]["accuracy_matrix"][-1]
    assert len(five) == 5
    _, labels = digits_test
    counts5 = [int(((labels >= 2 * j) & (labels < 2 * j + 2)).sum()) for j in range(5)]
    counts2 = [int(((labels >= 5 * j) & (labels < 5 * j + 5)).sum()) for j in range(2)]
    overall5 = sum(a * n for a, n in zip(five, counts5, strict=True)) / sum(counts5)
    overall2 = sum(a * n for a, n in zip(two, counts2, strict=True)) / sum(counts2)
    assert overall5 == pytest.approx(overall2, abs=1e-12)


# ----------------------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("strategy", ["replay", "der_expandable", "icarl"])
def test_the_exported_torchscript_model_scores_as_the_checkpoint(
    runs, strategy, digits_test, tmp_path, capsys
):
    images, _ = digits_test
    out = tmp_path / "model.torchscript"
    status, _, err = in_process(
        capsys, "export", str(runs[strategy]), "--format", "torchscript", "--out", str(out)
    )
    assert status == 0, err
    exported = torch.jit.load(str(out))
    batch = images[:50]  # not the batch size it was traced with
    pixels = torch.round(batch.double() * 255 / 16).float()  # the images as 8-bit files hold them
    loaded = inference.load(runs[strategy])
    torch.testing.assert_close(exported(pixels), checkpoint_scores(loaded, batch))
    classes = json.loads((tmp_path / "model.torchscript.classes.json").read_text())
    assert classes["class_names"] == [str(c) for c in range(10)]


def test_the_exported_onnx_model_scores_as_the_checkpoint(runs, digits_test, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    images, _ = digits_test
    out = tmp_path / "model.onnx"
    status, _, err = in_process(capsys, "export", str(runs["replay"]), "--format", "onnx", "--out", str(out))
    assert status == 0, err
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = images[:50]
    pixels = np.round(batch.numpy().astype(np.float64) * 255 / 16).astype(np.float32)
    (scores,) = session.run(None, {session.get_inputs()[0].name: pixels})
    loaded = inference.load(runs["replay"])
    torch.testing.assert_close(
        torch.from_numpy(scores), checkpoint_scores(loaded, batch), atol=1e-4, rtol=1e-4
    )


# ----------------------------------------------------------------------------------------- strategies
def test_a_grown_network_and_icarls_nearest_mean_classifier_load_and_predict(
    runs, digits_test, tmp_path, capsys, monkeypatch
):
    images, labels = digits_test
    paths = write_pngs(tmp_path / "pngs", images[::12], labels[::12])
    # predict needs no training data: loading a data set would fail here
    monkeypatch.setattr("incr_cli.data.sources.load_source", lambda *a, **k: pytest.fail("data loaded"))
    der = inference.load(runs["der_expandable"])
    assert len(der.model.backbone) == 2  # one extractor per task, rebuilt before the weights load
    icarl = inference.load(runs["icarl"])
    with torch.no_grad():
        x = icarl.preprocess(images[::12])
        nearest = nearest_mean_scores(icarl.model.backbone(x), icarl.strategy.class_means)
    torch.testing.assert_close(checkpoint_scores(icarl, images[::12]), nearest)
    for loaded in (der, icarl):
        predicted = predicted_labels(capsys, loaded.path, *paths)
        expected = checkpoint_scores(loaded, images[::12]).argmax(1).tolist()
        assert [predicted[p.name] for p in paths] == expected


def test_predict_prints_top_k_classes_with_probabilities(runs, digits_test, tmp_path, capsys):
    images, labels = digits_test
    paths = write_pngs(tmp_path / "pngs", images[:3], labels[:3])
    status, out, err = in_process(
        capsys, "predict", str(runs["replay"]), *map(str, paths), "--json", "--top-k", "4"
    )
    assert status == 0, err
    rows = json.loads(out)
    assert [Path(r["image"]).name for r in rows] == [p.name for p in paths]
    for row in rows:
        probabilities = [p["probability"] for p in row["predictions"]]
        assert len(probabilities) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    status, out, _ = in_process(capsys, "predict", str(runs["replay"]), str(paths[0]))
    assert status == 0 and "#3" in out and "#4" not in out  # the default: top 3
    first = rows[0]["predictions"][0]
    assert f"{first['class']} {first['probability']:.3f}" in out


# ----------------------------------------------------------------------------------------- bad input
def assert_one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_status_2(runs, tmp_path, capsys):
    checkpoint = str(runs["replay"] / "checkpoints" / "last.pt")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    cases = [
        (("predict", str(tmp_path / "missing.pt"), str(corrupt)), "no such"),
        (("predict", str(not_a_checkpoint), str(corrupt)), "not a usable incr checkpoint"),
        (("predict", checkpoint, str(empty)), "no image files"),
        (("predict", checkpoint, str(tmp_path / "nowhere.png")), "no such image"),
        (("predict", checkpoint, str(corrupt)), "cannot be read as an image"),
        (("predict", checkpoint, str(corrupt), "--top-k", "0"), "--top-k"),
        (("predict", checkpoint, str(corrupt), "--colour"), "unrecognized arguments"),
        (("export", checkpoint, "--format", "tflite"), "unknown format 'tflite'; valid: torchscript, onnx"),
        (("export", str(not_a_checkpoint)), "not a usable incr checkpoint"),
        (("eval", str(empty)), "no checkpoints/last.pt"),
        (("eval", checkpoint, "strategy=finetune"), "would change the model"),
        (("eval", checkpoint, "dataset.nope=1"), "unknown key dataset.nope"),
        (("eval", checkpoint, "dataset=nope"), "unknown dataset 'nope'"),
        (("eval", checkpoint, "dataset.n_tasks=3"), "does not divide"),
    ]
    for args, message in cases:
        status, _, err = in_process(capsys, *args)
        assert status == 2, (args, err)
        assert message in assert_one_line_error(err), (args, err)


def test_onnx_without_its_packages_says_what_to_install(runs, monkeypatch, capsys):
    real = inference.importlib.util.find_spec
    monkeypatch.setattr(
        inference.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("onnx", "onnxscript") else real(name, *a),
    )
    status, _, err = in_process(capsys, "export", str(runs["replay"]), "--format", "onnx")
    assert status == 2
    assert "pip install onnx onnxscript" in assert_one_line_error(err)


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_each_command_has_help(command, capsys):
    status, out, _ = in_process(capsys, command, "--help")
    assert status == 0 and f"usage: incr {command}" in out


def test_the_incr_command_exits_with_status_2(tmp_path):
    result = incr("predict", str(tmp_path / "missing.pt"), str(tmp_path))
    assert result.returncode == 2
    assert_one_line_error(result.stderr)
