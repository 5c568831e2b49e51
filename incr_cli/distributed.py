"""Data-parallel training over processes started by torchrun (`hardware=ddp`).

Every rank holds the whole stream on its device and cuts the same global batches (same seed); rank r trains
on its r-th slice of each batch. After each backward pass the gradients are averaged over ranks, weighted
by slice size, in one all-reduce of one flat buffer, which is what DistributedDataParallel's bucketed
all-reduce computes. The engine does it itself rather than wrapping the model in `DistributedDataParallel`
because strategies call the model's parts directly (backbone, head, frozen copies), which the wrapper's
forward-pass bookkeeping does not see. For a loss that is a mean over its batch (fine-tuning), the
averaged gradient is the single-process gradient of the whole global batch; every rank then takes the
same step, so the weights stay identical. Memories, evaluation and every strategy's state are computed
identically on every rank (from the full data and the shared random generator); rank 0 alone writes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process is one rank of a run: started by torchrun (one machine or `--nnodes`), or one task of
    a SLURM job of several tasks that Hydra's submitit launcher started (hydra/launcher=slurm with
    tasks_per_node and nodes), whose SLURM variables submitit's helper turns into torchrun's."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS") or 1) < 2:
        return False
    from submitit.helpers import TorchDistributedEnvironment

    # MASTER_ADDR: the job's first node; MASTER_PORT: as set, or drawn from the job id; LOCAL_RANK picks the GPU
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return True


def start(device_type: str) -> torch.device:
    """Join the process group torchrun (or a SLURM job's tasks, `launched`) set up; returns this rank's device."""
    launched()  # a SLURM task: torchrun's variables from SLURM's
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's slice of a global batch's rows, and its weight in the gradient average (its share of the
    batch). A batch smaller than the world is trained whole on every rank, each with weight 1 / world."""
    world = world_size()
    if world == 1:
        return rows, 1.0
    if len(rows) < world:
        return rows, 1.0 / world
    mine = torch.tensor_split(rows, world)[rank()]
    return mine, len(mine) / len(rows)


def average_gradients(parameters: list[torch.nn.Parameter], weight: float) -> None:
    """grad <- sum over ranks of weight_r * grad_r, for every parameter that takes a gradient."""
    trained = [p for p in parameters if p.requires_grad]
    for p in trained:
        if p.grad is None:  # unused on this rank, maybe not on another: the collective needs every tensor
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in trained]) * weight
    dist.all_reduce(flat)
    offset = 0
    for p in trained:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def agree(*flags: bool) -> list[bool]:
    """Whether any rank raised each flag (a non-finite loss, a stop signal): every rank acts the same."""
    if not active():
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] without ddp."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast_text(text: str) -> str:
    """Rank 0's string on every rank (the run directory)."""
    if not active():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop() -> None:
    if active():
        dist.destroy_process_group()
