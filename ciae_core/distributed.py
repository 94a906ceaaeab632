"""Where this process sits in a distributed job, and which share of the sample stream it trains on.

Distributed training uses torch's own engine: start with
``torchrun --nproc_per_node=G [--nnodes N --node_rank R --rdzv-endpoint HOST:PORT] -m ciae_core.cli.train ...``;
every process trains a DDP replica on its shard of a deterministic sample stream (NCCL on CUDA,
gloo on CPU), the memory-embedding batch means are all-reduced by the model (see ``ciae_core.losses``),
and only rank 0 writes checkpoints and logs. At the end all ranks compare a hash of their weights
and buffers (:func:`check_replicas_agree`).

Decision: instead of ``DistributedSampler`` (whose position is an epoch + an index the loader
does not expose) the data come from ``TrainingSampler``, an infinite stream in which global
position ``p`` goes to rank ``p % world_size`` and carries its own augmentation seed
(``SeededDataset``); iteration ``i`` starts at position ``i * ims_per_batch``. Resuming therefore
needs only the iteration number, with any number of loader workers.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from ciae_core.train_config import TrainError


@dataclass
class DistContext:
    """Where this process sits in the job (``world_size`` 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available else CPU; ``cuda``/``cuda:N`` without a GPU (or without GPU N)
    is a ``TrainError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"device '{name}' requested but torch sees no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainError(f"device '{name}' requested but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1) and pick this rank's device.

    NCCL on CUDA, gloo on CPU; each process uses GPU ``LOCAL_RANK``. An already initialised
    process group (e.g. created by a test harness) is reused.
    """
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device.index is not None and world_size > 1:
        raise TrainError(f"device '{device_name}' names one GPU, but under torchrun each of the {world_size} "
                         f"processes uses GPU LOCAL_RANK: use --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif world_size > 1:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    else:
        rank, local_rank = 0, 0
    if device.type == "cuda":
        if device.index is None:  # one process per GPU: this one's is LOCAL_RANK (0 for a single process)
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks (on this rank's GPU with NCCL)."""
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``model`` as a ``DistributedDataParallel`` replica when the job has several ranks, else itself."""
    if not ctx.distributed:
        return model
    # Buffers are not broadcast from rank 0 at each forward: the memory embeddings are updated
    # identically on every rank from all-reduced class means (ciae_core.losses).
    import inspect

    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        find_unused_parameters=False, **no_buffer_sync)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def reduce_scalars(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of each scalar over all ranks (for logging)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist()))


def parameter_fingerprint(module: torch.nn.Module) -> int:
    """A 63-bit hash of all parameters and buffers (bit-exact: equal only for identical bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_replicas_agree(module: torch.nn.Module, ctx: DistContext) -> None:
    """Raise ``TrainError`` unless every rank holds bit-identical weights and buffers."""
    if not ctx.distributed:
        return
    fp = torch.tensor([parameter_fingerprint(module)], dtype=torch.int64,
                      device=ctx.device if ctx.device.type == "cuda" else "cpu")
    gathered = [torch.zeros_like(fp) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, fp)
    values = [int(g.item()) for g in gathered]
    if len(set(values)) != 1:
        raise TrainError(f"DDP replicas diverged: weight fingerprints per rank {values}")


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable sample stream
# ---------------------------------------------------------------------------------------------


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global stream ``position`` (independent of workers/ranks)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, position & 0xFFFFFFFF, position >> 32]).generate_state(1)[0])


class TrainingSampler(torch.utils.data.Sampler):
    """Infinite deterministic stream of ``(dataset_index, augmentation_seed)`` for one rank.

    The global stream visits epoch ``e`` as ``randperm(size)`` drawn from ``seed + e``; global
    position ``p`` belongs to rank ``p % world_size``. Iteration ``i`` of a run with global batch
    ``B`` consumes positions ``[i*B, (i+1)*B)``, so ``start = i*B`` resumes the stream exactly
    (and each rank sees ``B / world_size`` of them per iteration).
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0,
                 shuffle: bool = True):
        if size <= 0:
            raise TrainError("the training dataset is empty")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.start, self.shuffle = start, shuffle

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start + ((self.rank - self.start) % self.world_size)
        epoch, order = -1, None
        while True:
            e = p // self.size
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield int(order[p % self.size]), sample_seed(self.seed, p)
            p += self.world_size


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that item ``(index, seed)`` is produced with all global RNGs
    (python ``random``, numpy, torch) seeded from ``seed``: augmentation becomes a function of the
    stream position, whatever worker computes it. The caller's RNG states are restored afterwards.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

