"""Which process does the work that is done once.

Under ``trainer.strategy=ddp`` every process runs the whole command (Lightning relaunches it), so
work outside a Trainer call is gated here: files are written by global rank zero only, and the
processes meet at a barrier before anyone reads what rank zero wrote. Under ``ddp_spawn`` only the
main process runs this code (the spawned ones run inside Trainer calls), and the barrier is a
no-op. The process group outlives each Trainer, so barriers work between stages.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_global_zero() -> bool:
    """True in the process that writes shared files: global rank zero, or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # a relaunched DDP process before its first Trainer call: the launcher's environment says
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def barrier() -> None:
    """Wait for every process of the run (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def echo(message: str) -> None:
    """One console line, from global rank zero only."""
    if is_global_zero():
        print(message, flush=True)
