"""Samplers that make training reproducible across resumes and process counts.

Each item index is yielded together with its own augmentation seed, drawn from
(``run.seed``, epoch, position): the data set reseeds its albumentations pipeline per item, so
what an item looks like never depends on which worker or process loads it, nor on what ran
before. The order is a permutation of (seed, epoch). Neither touches the global RNGs, so a run
resumed from a checkpoint replays exactly what an uninterrupted run would have done.

Under DDP, ``data.batch_size`` is the global batch: every global batch is the one a single
process would have drawn, split into equal contiguous parts, one per process. With gradients
averaged over processes (and synchronised batch norm) training follows the single-process run.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import Sampler

_SEED_SPACE = 2**31 - 1


def item_seeds(seed: int, epoch: int, count: int) -> torch.Tensor:
    """One augmentation seed per position of an epoch, from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randint(0, _SEED_SPACE, (count,), generator=generator)


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` for this process's share of each global batch.

    shuffle: a fresh permutation of (seed, epoch) each epoch; otherwise the data set order.
    epoch_source: where the epoch is read when an epoch's iterator is made (the Trainer's
    epoch). Lightning also calls ``set_epoch``, but a DataLoader with workers makes the
    first iterator of a resumed fit before that call, which would replay epoch 0's order.
    drop_last: drop the incomplete last global batch.
    with_epoch: yield ``(index, augmentation_seed, epoch)``, for data sets whose own random
    choices depend on the epoch (``wsss.data.copy_paste``).
    The share of a global batch of ``batch_size`` items is ``batch_size // world_size`` items;
    ``batch_size`` must divide evenly. An incomplete last batch (without drop_last) is padded
    by repeating its first items so every process gets the same number of items.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        epoch_source: Optional[Callable[[], int]] = None,
        with_epoch: bool = False,
    ) -> None:
        if num_items < 1:
            raise ValueError("cannot sample from an empty data set")
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} is the global batch and must divide evenly "
                f"over {world_size} processes; use a multiple of {world_size}"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        # never drop everything: a data set smaller than one batch is one (padded) batch
        self.drop_last = drop_last and num_items >= batch_size
        self.epoch = 0
        self.epoch_source = epoch_source
        self.with_epoch = with_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_order(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return torch.randperm(self.num_items, generator=generator)
        return torch.arange(self.num_items)

    def _my_positions(self) -> torch.Tensor:
        """Positions (into the epoch's order) of this process's items, batch by batch."""
        per_rank = self.batch_size // self.world_size
        full, rest = divmod(self.num_items, self.batch_size)
        head = torch.arange(full * self.batch_size).view(full, self.world_size, per_rank)[
            :, self.rank
        ]
        head = head.flatten()
        if rest == 0 or self.drop_last:
            return head
        share = -(-rest // self.world_size)  # ceil: every process gets the same count
        last = torch.arange(full * self.batch_size, self.num_items)
        last = last.repeat(-(-share * self.world_size // rest))[: share * self.world_size]
        return torch.cat([head, last.view(self.world_size, share)[self.rank]])

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        if self.epoch_source is not None:
            self.epoch = int(self.epoch_source())
        order = self._global_order()
        seeds = item_seeds(self.seed, self.epoch, self.num_items)
        positions = self._my_positions()
        keys = zip(order[positions].tolist(), seeds[positions].tolist())
        if self.with_epoch:
            return iter([(index, seed, self.epoch) for index, seed in keys])
        return iter(list(keys))

    def __len__(self) -> int:
        return len(self._my_positions())


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th item from ``rank``, in order, nothing repeated: evaluation shares
    whose metrics are summed over processes (torchmetrics) count each item exactly once."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.rank, self.world_size = num_items, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.world_size))
