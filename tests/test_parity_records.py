"""benchmarks/parity.py's bookkeeping: which run records a row reads, and which seeds its table counts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PARITY = Path(__file__).resolve().parent.parent / "benchmarks" / "parity.py"


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity_benchmark", PARITY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def write_record(parity, out: Path, tool: str, method: str, seed: int, accuracy: float, seconds: float):
    path = parity.record_file(out, tool, method, "convnet", seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tool": tool,
        "method": method,
        "protocol": "convnet",
        "seed": seed,
        "final_average_accuracy": accuracy,
        "forgetting": 0.1,
        "total_seconds": seconds,
        "train_seconds": seconds / 2,
    }
    path.write_text(json.dumps(record))


def rows(methods, seeds):
    return [(tool, m, "convnet", s) for m in methods for s in seeds for tool in ("incr", "avalanche")]


def test_a_row_that_shares_a_tools_runs_reads_them_and_counts_only_seeds_both_tools_finished(
    parity, tmp_path
):
    # gem_fresh_views changes Avalanche's side only: its incr runs are gem's
    write_record(parity, tmp_path, "incr", "gem", 0, 0.80, 10.0)
    write_record(parity, tmp_path, "avalanche", "gem_fresh_views", 0, 0.81, 20.0)
    write_record(parity, tmp_path, "incr", "gem", 1, 0.79, 10.0)  # seed 1: Avalanche's not finished
    records = parity.finished_records(rows(["gem_fresh_views"], [0, 1]), tmp_path)
    assert sorted((r["tool"], r["method"], r["seed"]) for r in records) == [
        ("avalanche", "gem_fresh_views", 0),
        ("incr", "gem_fresh_views", 0),
    ]
    assert next(r for r in records if r["tool"] == "incr")["final_average_accuracy"] == 0.80
    # the capped SI row shares the uncapped row's Avalanche runs
    write_record(parity, tmp_path, "incr", "si_curvature_limit", 0, 0.20, 10.0)
    write_record(parity, tmp_path, "avalanche", "si", 0, 0.19, 30.0)
    shared = parity.finished_records(rows(["si_curvature_limit"], [0]), tmp_path)
    assert {(r["tool"], r["final_average_accuracy"]) for r in shared} == {("incr", 0.20), ("avalanche", 0.19)}


def test_the_table_gives_each_rows_mean_difference_time_ratio_and_seed_count(parity, tmp_path):
    for seed, (mine, theirs) in enumerate([(0.80, 0.70), (0.82, 0.74)]):
        write_record(parity, tmp_path, "incr", "replay", seed, mine, 10.0)
        write_record(parity, tmp_path, "avalanche", "replay", seed, theirs, 30.0)
    write_record(parity, tmp_path, "incr", "replay", 2, 0.5, 10.0)  # unmatched: left out
    records = parity.finished_records(rows(["replay"], [0, 1, 2]), tmp_path)
    table = parity.render(records, ["convnet"], ["replay"], "command", threads=1, jobs=2)
    row = next(line for line in table.splitlines() if line.startswith("| replay |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # incr 81 +- 1.41, Avalanche 72 +- 2.83, 9 points apart, Avalanche 3 times slower, 2 seeds
    assert cells[2:5] == ["81.00 ± 1.41", "72.00 ± 2.83", "+9.00"]
    assert cells[6:] == ["3.00", "3.00", "2"]


def test_writing_into_a_page_replaces_only_the_protocols_block_and_refuses_a_page_without_one(
    parity, tmp_path
):
    for tool, accuracy in [("incr", 0.80), ("avalanche", 0.78)]:
        write_record(parity, tmp_path, tool, "replay", 0, accuracy, 10.0)
    records = parity.finished_records(rows(["replay"], [0]), tmp_path)
    begin, end = parity.block_markers("convnet")
    page = tmp_path / "page.md"
    page.write_text(f"prose before\n{begin}\nan old table\n{end}\nprose after\n")
    parity.write_table(page, records, ["convnet"], ["replay", "gem"], whole="the whole rendering")
    text = page.read_text()
    assert text.startswith(f"prose before\n{begin}\n| method |") and text.endswith(f"{end}\nprose after\n")
    assert (
        "an old table" not in text and "| replay | replay (Replay) | 80.00 ± – | 78.00 ± – | +2.00 |" in text
    )
    # gem has no records: neither its row nor its note is written
    assert "| gem |" not in text and "- gem:" not in text and "- replay: memory" in text
    bare = tmp_path / "bare.md"
    bare.write_text("a page without markers\n")
    with pytest.raises(SystemExit, match="parity-convnet"):
        parity.write_table(bare, records, ["convnet"], ["replay"], whole="the whole rendering")
    assert bare.read_text() == "a page without markers\n"
    new = tmp_path / "new" / "table.md"
    parity.write_table(new, records, ["convnet"], ["replay"], whole="the whole rendering")
    assert new.read_text() == "the whole rendering"


def test_in_step_augmentation_draws_torchvision_crops_and_flips(parity):
    """The reservoir DER's augmentation of normalised batches: every output is one of torchvision's
    RandomCrop(28, padding=4) + RandomHorizontalFlip results on the raw image, normalised, and the draws vary."""
    from torchvision.transforms import functional as TF

    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (1, 28, 28), generator=generator).float() / 255  # ToTensor's range
    normalise = lambda image: (image - parity.MEAN) / parity.STD  # noqa: E731
    padded = TF.pad(raw, [4] * 4, fill=0)
    candidates = torch.stack(
        [
            normalise(view)
            for r in range(9)
            for c in range(9)
            for view in (TF.crop(padded, r, c, 28, 28), TF.hflip(TF.crop(padded, r, c, 28, 28)))
        ]
    )
    torch.manual_seed(0)
    out = parity.augment_batch(normalise(raw).expand(200, 1, 28, 28).clone(), 4)
    distance = (out[:, None] - candidates[None]).abs().flatten(2).amax(-1)  # (200, 162)
    assert distance.min(dim=1).values.max() < 1e-5  # every output is a torchvision view
    matched = distance.argmin(dim=1)
    assert len(set(matched.tolist())) > 60  # offsets and flips are drawn, not fixed
    assert {index % 2 for index in matched.tolist()} == {0, 1}  # flipped and not


def test_reservoir_der_memory_keeps_a_uniform_sample_with_its_step_logits(parity):
    """The reservoir DER's memory over a stub of Avalanche's DER hooks: at most mem_size samples, each with the
    logits its own step computed, drawn uniformly over the stream; replay only once a memory batch is held."""
    torch = pytest.importorskip("torch")

    class Template:  # the hooks reservoir_der calls past the DER class
        def _before_forward(self, **kwargs):
            pass

        def _after_training_iteration(self, **kwargs):
            pass

    class StubDER(Template):
        def __init__(self, mem_size, batch_size_mem):
            self.mem_size, self.batch_size_mem = mem_size, batch_size_mem

    strategy = parity.reservoir_der(StubDER, augment=False)(mem_size=50, batch_size_mem=8)
    torch.manual_seed(0)
    replayed = []
    for step in range(200):  # 200 steps of 8 samples, labels cycling over 10 classes; x carries its own index
        index = torch.arange(step * 8, step * 8 + 8)
        strategy.mbatch = [index.float().view(8, 1, 1, 1), index % 10, torch.zeros(8, dtype=torch.long)]
        strategy._before_forward()
        replayed.append(len(strategy.mbatch[0]) - 8)
        # a "network" whose logit 0 is the input's index: the stored logits must follow their samples
        strategy.mb_output = strategy.mbatch[0].view(-1, 1).expand(-1, 10).clone()
        strategy._after_training_iteration()
    assert replayed[0] == 0 and set(replayed[1:]) == {8}  # the first step has no memory yet
    assert strategy.seen == 1600
    stored = strategy.stored
    assert stored["x"].shape[0] == 50 and len(set(stored["x"].flatten().tolist())) == 50
    assert torch.equal(stored["logits"][:, 0], stored["x"].flatten())  # each sample's own step's logits
    assert torch.equal(stored["y"], stored["x"].flatten().long() % 10)
    assert stored["x"].flatten().mean() > 400  # uniform over 0..1599, not the first 50 seen
