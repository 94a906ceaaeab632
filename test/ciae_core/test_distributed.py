"""Tests of ciae_core.distributed: the deterministic, resumable, rank-sharded sample stream and a 2-rank DDP run."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import numpy as np
import torch

from ciae_core.distributed import SeededDataset, TrainingSampler
from ciae_core.train import train
from ciae_core.train_config import load_config

from train_testing import CONFIGS, assert_same_tensors, free_port, tiny_model_and_optimizer, weights_of


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_deterministic_covers_epochs_and_resumes():
    a = _take(TrainingSampler(10, seed=3), 25)
    assert a == _take(TrainingSampler(10, seed=3), 25)
    assert a != _take(TrainingSampler(10, seed=4), 25)
    assert sorted(i for i, _ in a[:10]) == list(range(10)) and sorted(i for i, _ in a[10:20]) == list(range(10))
    assert len({s for _, s in a}) == 25  # every position has its own augmentation seed
    assert _take(TrainingSampler(10, seed=3, start=7), 18) == a[7:]


def test_sampler_shards_the_global_stream_across_ranks():
    full = _take(TrainingSampler(7, seed=1), 24)
    for start in (0, 6, 12):
        r0 = _take(TrainingSampler(7, seed=1, rank=0, world_size=2, start=start), 6)
        r1 = _take(TrainingSampler(7, seed=1, rank=1, world_size=2, start=start), 6)
        assert r0 == full[start::2][:6] and r1 == full[start + 1::2][:6]


def test_seeded_dataset_makes_augmentation_a_function_of_the_seed():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (i, random.random(), float(np.random.rand()), float(torch.rand(())))

    ds = SeededDataset(Noisy())
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a, b, c = ds[(1, 42)], ds[(1, 42)], ds[(1, 43)]
    assert a == b and a != c
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])


def _ddp_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    cfg = load_config(CONFIGS / "synthetic_smoke.yaml", ["solver.ims_per_batch=4", "solver.max_iter=3",
                                                         "eval.period=-1", "output.tensorboard=false"])
    try:
        result = train(cfg, out_dir=Path(tmp) / f"out{rank}")
        save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
                  str(Path(tmp) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_end_with_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = weights_of(tmp_path / "rank0.safetensors"), weights_of(tmp_path / "rank1.safetensors")
    assert_same_tensors(r0, r1)
    assert (tmp_path / "out0" / "model.safetensors").is_file()
    assert not (tmp_path / "out1").exists()  # only rank 0 writes
    # the memory embeddings moved (batch means were all-reduced, not left at the initialisation)
    model, _ = tiny_model_and_optimizer()
    assert not torch.equal(model.state_dict()["memory"], r0["memory"])
