"""Data-parallel training on many processes (torch.distributed): who this process is, its share of the data, gathering.

`torchrun --nproc_per_node N train_ad.py ...` starts N copies of a training script and sets
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in their environment; `init` joins them into one
process group (NCCL on CUDA, gloo on CPU). Each process holds the whole model and reads its 1/N
share of every batch (`shard`); DDP averages the gradients, so one step is the single process's
step on the whole batch and Eq. 3 is unchanged (with --sync-bn even the batch norms see the whole
batch). Without torchrun every function here is the single process's no-op, so a plain
`python train_ad.py` run is exactly what it was.

Rank 0 alone writes files and prints; work that must happen once (generating the synthetic
cohort, decoding the image cache, HyperFusion's tabular pre-training) runs on rank 0 inside
`main_first` while the others wait, then they read what it wrote. Predictions are `gather`ed so
every process computes the metrics on every validation and test subject, each counted once.
"""
import atexit
import contextlib
import datetime
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from safeio import UserError

_state = {"alone": False}  # True while rank 0 works by itself (see `alone`)


# ----------------------------------------------------------------------------------------------
# Who this process is

def launched():
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size():
    """Processes of this run on this machine (they share its cores and GPUs)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init(device_type):
    """Join the process group torchrun describes: NCCL on CUDA, gloo on CPU. A no-op without torchrun.

    The timeout of a collective is WAIT_HOURS, not NCCL's 10 minutes: the other ranks wait at a barrier
    while rank 0 decodes the image cache (26,691 brain-age scans: 24 minutes in one process)."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=WAIT_HOURS))
        atexit.register(dist.destroy_process_group)


WAIT_HOURS = 2


def world_size():
    return 1 if _state["alone"] or not dist.is_initialized() else dist.get_world_size()


def rank():
    return 0 if _state["alone"] or not dist.is_initialized() else dist.get_rank()


def is_main():
    """Rank 0: the one process that prints and writes files."""
    return rank() == 0


def log(message, quiet=False):
    """Print, unless quiet or not rank 0 of a torchrun run."""
    if not quiet and is_main():
        print(message, flush=True)


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. decodes the cache), the others run it once rank 0 is done."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


@contextlib.contextmanager
def alone():
    """Inside, rank 0 works by itself as a single process (HyperFusion's tabular pre-training, Sec. 4.3.6)."""
    before, _state["alone"] = _state["alone"], True
    try:
        yield
    finally:
        _state["alone"] = before


# ----------------------------------------------------------------------------------------------
# The model: DDP, and batch norms over the whole batch

def wrap(model, device, sync_bn=False):
    """-> (model, net): `net` is what trains (DDP around `model`); `model` is what is saved and evaluated.

    sync_bn: every BatchNorm normalises with the statistics of the whole batch across the processes:
    on CUDA torch.nn.SyncBatchNorm (convert_sync_batchnorm); on CPU, which torch's refuses, the same
    computation here (GlooSyncBatchNorm), so it is tested. The parameter names stay those of the
    BatchNorm, so checkpoints load either way. Alone: (model, model)."""
    if world_size() == 1:
        return model, model
    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn:
        for m in model.modules():
            if type(m) in GLOO_SYNC:
                m.__class__ = GLOO_SYNC[type(m)]
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class GlooSyncBatchNorm:
    """What torch.nn.SyncBatchNorm computes, for CPU tensors (mixed into BatchNorm1d/2d/3d below).

    In training the per-channel sums are all-reduced over the processes (AllReduce, whose backward
    all-reduces the gradients too): the output and the gradients are those of one
    BatchNorm over the whole batch (two passes: the mean, then the squared deviations from it).
    In evaluation, or alone, it is the BatchNorm it was."""

    def forward(self, x):
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims, shape = [0] + list(range(2, x.dim())), [1, -1] + [1] * (x.dim() - 2)
        n = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype)
        dist.all_reduce(n)                                                   # samples x voxels, all processes
        mean = AllReduce.apply(x.sum(dims)) / n                           # (C,)
        var = AllReduce.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=f)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class AllReduce(torch.autograd.Function):
    """A sum over the processes that gradients flow through: every process's input reaches every
    process's output, so the backward sums the incoming gradients over the processes as well."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm1d(GlooSyncBatchNorm, torch.nn.BatchNorm1d):
    """BatchNorm1d over the whole batch of all processes (CPU)."""


class GlooSyncBatchNorm2d(GlooSyncBatchNorm, torch.nn.BatchNorm2d):
    """BatchNorm2d over the whole batch of all processes (CPU)."""


class GlooSyncBatchNorm3d(GlooSyncBatchNorm, torch.nn.BatchNorm3d):
    """BatchNorm3d over the whole batch of all processes (CPU)."""


GLOO_SYNC = {torch.nn.BatchNorm1d: GlooSyncBatchNorm1d, torch.nn.BatchNorm2d: GlooSyncBatchNorm2d,
             torch.nn.BatchNorm3d: GlooSyncBatchNorm3d}


# ----------------------------------------------------------------------------------------------
# The data: each process's share, and the predictions gathered back

def shard(dataset, shuffle, sampler=None):
    """This process's share of `dataset`: a DistributedSampler, or, for a weighted sampler (App. C.4), the
    same weighted draw on every process dealt out. Either pads to a multiple of N with the first items;
    call set_epoch(seed) each epoch for a new order."""
    if sampler is not None:
        return ShardedSampler(sampler)
    return torch.utils.data.DistributedSampler(dataset, world_size(), rank(), shuffle=shuffle)


class ShardedSampler(torch.utils.data.Sampler):
    """A sampler drawn with the same seed on every process, then dealt out round-robin (padded)."""

    def __init__(self, base):
        self.base, self.seed = base, 0
        self.per_rank = math.ceil(len(base) / world_size())

    def set_epoch(self, seed):
        self.seed = seed

    def __len__(self):
        return self.per_rank

    def __iter__(self):
        self.base.generator = torch.Generator().manual_seed(self.seed)
        idx = list(self.base)
        idx += idx[:self.per_rank * world_size() - len(idx)]
        return iter(idx[rank()::world_size()])


def local_batch(batch_size):
    """Each process's part of the run's batch (--batch-size is the whole step's, as in Table 1)."""
    if batch_size % world_size():
        raise UserError(f"--batch-size {batch_size}: not divisible by the {world_size()} processes")
    return batch_size // world_size()


def gather(rows, n):
    """Every process's rows of its DistributedSampler share (shuffle off) -> all n rows in dataset order.

    The sampler gave rank r the items r, r + N, r + 2N, ... of the padded order; interleaving the
    shares back and dropping the padding counts every subject exactly once."""
    if world_size() == 1:
        return rows
    parts = [None] * world_size()
    dist.all_gather_object(parts, rows)
    out = np.empty((sum(len(p) for p in parts),) + rows.shape[1:], rows.dtype)
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out[:n]


def sum_all(*values):
    """Each value summed over the processes (e.g. the epoch's loss total and sample count)."""
    if world_size() == 1:
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values)          # objects, so NCCL needs no CUDA tensor here
    return tuple(map(sum, zip(*parts)))


def first_reported(value):
    """The first process's value that is not None, on every process (rank 0's refusal of a run folder, or
    what one process found non-finite): one verdict for all, so that no process stops while the others
    wait for it in a collective. Alone: value."""
    if world_size() == 1:
        return value
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return next((p for p in parts if p is not None), None)


def average(tensors):
    """Each tensor replaced, in place, by its mean over the processes (e.g. re-estimated BatchNorm statistics)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
