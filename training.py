"""The training machinery both tasks share: device, loaders, the loop, checkpoints.

train_ad.py and train_brain_age.py each describe one run of their task (data, model, loss, metric)
and hand it to `fit`, the hand-written loop of both (Adam with weight decay, Eq. 3). What defines the run
is its RunConfig (runconfig.py), written into every checkpoint with the facts it learned from its data
(`inputs`: tabular columns, classes, crops, image shape), so that a checkpoint of another run is refused and
a finished run can be replayed exactly (runs.py). A run that diverges stops in one line with its last good
checkpoint kept (fit); its folder holds that one run alone (runfolder.py).
"""
import atexit
import contextlib
import datetime
import math
import os
import numpy as np
import torch
import torch.distributed as dist
import dataclasses
import socket
import copy
import io
import random
import time
import json
from torch.nn.parallel import DistributedDataParallel
from data import (UserError, check_number, warn, Progress, write_bytes, write_csv, CLASS_NAMES, HippocampusCrops,
    TabularPreprocessor)
from layers import HyperLayer
from dataclasses import dataclass
from models import build_model, AgeTarget
from scipy.optimize import minimize_scalar
from data import atomic_path, write_json
from metrics import calibration_metrics
from models import class_probabilities


# ---- distributed -------------------------------------------------------------------------------
# Data-parallel training on many processes (torch.distributed): who this process is, its share of the data, gathering.
#
# `torchrun --nproc_per_node N train_ad.py ...` starts N copies of a training script and sets
# RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in their environment; `init` joins them into one
# process group (NCCL on CUDA, gloo on CPU). Each process holds the whole model and reads its 1/N
# share of every batch (`shard`); DDP averages the gradients, so one step is the single process's
# step on the whole batch and Eq. 3 is unchanged (with --sync-bn even the batch norms see the whole
# batch). Without torchrun every function here is the single process's no-op, so a plain
# `python train_ad.py` run is exactly what it was.
#
# Rank 0 alone writes files and prints; work that must happen once (generating the synthetic
# cohort, decoding the image cache, HyperFusion's tabular pre-training) runs on rank 0 inside
# `main_first` while the others wait, then they read what it wrote. Predictions are `gather`ed so
# every process computes the metrics on every validation and test subject, each counted once.

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


# ---- precision ---------------------------------------------------------------------------------
# The arithmetic a run computes in (--precision): float32, or a reduced-precision recipe under autocast.
#
# A recipe is a base precision and the parts of the run it keeps in float32 (PARTS):
#     fp32                    float32 everywhere; on a GPU with TF32 off, so that float32 means float32
#     bf16                    bfloat16 autocast in training, precise BN and evaluation (no loss scaling)
#     fp16                    float16 autocast with loss scaling (CUDA only)
#     bf16+fp32:hyper,bn      bfloat16, the hyperlayers and every BatchNorm kept in float32
# The recipe is stored in the run (RunConfig.precision, part of its identity) and replayed with it.
#
# --precision auto takes AUTO[device type]: a reduced-precision recipe only where the paired accuracy
# benchmark (bench_precision.py) has shown it non-inferior to float32 on that kind of device; float32
# otherwise. On a 2-core CPU with native bfloat16, 8 paired AD versions put bfloat16's loss of BA in
# [-0.051, +0.044] (not shown below 0.02) at 0.95x the speed, and 8 brain-age versions its loss of MAE in
# [-0.09, +0.19] years (not shown below 0.15) (RESULTS.md, "Precision"): auto is float32.
# No GPU has measured it yet: auto is float32 on CUDA too, until bench_precision.py's GPU run says more.

BASES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a recipe may keep in float32 under autocast, one part at a time (the ablation of bench_precision.py)
PARTS = {
    "hyper": "the hyperlayers: embedding, generators, generated weights and biases, and their product",
    "bn": "every BatchNorm's forward (training, precise BN, evaluation)",
    "first": "the first layer, on the raw input",
    "head": "the layers after the image features (AD fc1 and fc2, brain age its four linears)",
    "conv": "every convolution of the image network that is not a hyperlayer",
    "loss": "the loss, on float32 outputs",
    "precise-bn": "the precise-BN re-estimation pass (brain age)",
    "eval": "validation, test and prediction forward passes",
}
MODULE_PARTS = ("hyper", "bn", "first", "head", "conv")      # kept in float32 by keep_float32, on the model's modules
AUTO = {"cpu": "fp32", "cuda": "fp32"}               # what auto takes per device type (see the docstring)
PRECISIONS = ("auto",) + tuple(BASES)                # the plain choices; recipes with parts are accepted too


def parse(recipe):
    """"bf16+fp32:hyper,bn" -> ("bf16", ("hyper", "bn")), parts in PARTS' order; ValueError saying what is wrong."""
    base, _, kept = str(recipe).partition("+")
    if base not in BASES:
        raise ValueError(f"one of {', '.join(PRECISIONS)}, or a recipe such as bf16+fp32:hyper,bn")
    if not kept:
        return base, ()
    if base == "fp32" or not kept.startswith("fp32:"):
        raise ValueError(f"a recipe is bf16 or fp16, then +fp32: and the parts kept in float32 ({', '.join(PARTS)})")
    parts = kept[len("fp32:"):].split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown part {unknown[0] if unknown else '(none)'!r}: the parts are {', '.join(PARTS)}")
    return base, tuple(p for p in PARTS if p in parts)


def canonical(recipe):
    """One spelling per recipe (parts in PARTS' order), so that a resume compares recipes, not spellings."""
    base, parts = parse(recipe)
    return base + ("+fp32:" + ",".join(parts) if parts else "")


def base(recipe):
    """The autocast precision of a recipe: "fp32", "bf16" or "fp16"; None (a run from before precision was
    stored) is fp32."""
    return parse(recipe)[0] if recipe else "fp32"


def keeps(recipe, part):
    """Whether `recipe` keeps `part` in float32 (fp32 keeps everything)."""
    b, parts = parse(recipe) if recipe else ("fp32", ())
    return b == "fp32" or part in parts


def native_bf16(device):
    """Whether `device` computes bfloat16 natively: a GPU with bf16 units (Ampere and later), a CPU with
    AVX512-BF16 or AMX. Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def unsupported(recipe, device):
    """Why `device` cannot compute in `recipe`, or None when it can: float16 (with loss scaling) is for
    CUDA, bfloat16 on CUDA needs a GPU that has it."""
    b = base(recipe)
    if b == "fp16" and device.type != "cuda":
        return "float16 with loss scaling is for CUDA; on CPU use bf16 or fp32"
    if b == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32"
    return None


def resolve_precision(name, device, quiet=False):
    """--precision -> the run's recipe on `device` (canonical; stored in its identity). auto: AUTO[device type]
    where the device computes it natively, else float32. A name that is no recipe, or one the device cannot
    compute, is a UserError naming the option. On CUDA, TF32 is switched off (allow_tf32 = False for
    matmuls and cuDNN, whose default is on): the float32 parts of every recipe are float32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if name == "auto":
        chosen = AUTO.get(device.type, "fp32")
        if base(chosen) == "bf16" and not native_bf16(device) or unsupported(chosen, device):
            chosen = "fp32"
        why = ("float32 until bench_precision.py shows a faster recipe as accurate on this kind of device; "
               "--precision bf16 is the option, its cost measured in RESULTS.md" if chosen == "fp32" else
               "shown as accurate as float32 on this kind of device; --precision fp32 for full precision")
        log(f"precision {chosen} (--precision auto: {why})", quiet)
        return chosen
    try:
        recipe = canonical(name)
    except ValueError as exc:
        raise UserError(f"--precision {name}: {exc}") from None
    if unsupported(recipe, device):
        raise UserError(f"--precision {name}: {unsupported(recipe, device)}")
    log(f"precision {recipe}" + (" (emulated on this CPU: slower than fp32)"
                                  if base(recipe) == "bf16" and not native_bf16(device) else ""), quiet)
    return recipe


def replay_precision(trained, device):
    """The recipe that replays a run on `device` as it was trained and tested: its own, unless the device
    cannot do it (unsupported) or the run is from before precision was stored: float32."""
    try:
        return canonical(trained) if trained and not unsupported(trained, device) else "fp32"
    except ValueError:
        return "fp32"


def autocast(device, recipe, part=None):
    """The forward pass at the recipe's precision: autocast to bfloat16 / float16, or none for fp32 and for a
    `part` ("loss", "precise-bn", "eval") that the recipe keeps in float32."""
    dtype = BASES[base(recipe)]
    enabled = dtype is not None and not (part is not None and keeps(recipe, part))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=enabled)


def module_parts(model):
    """{part: [modules]} of MODULE_PARTS in `model`: its HyperLayers, BatchNorms, first layer (the first
    convolution or linear registered), its head (the model's `head_layers`, models.py) and its convolutions."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear, HyperLayer))]
    return {"hyper": [m for m in model.modules() if isinstance(m, HyperLayer)],
            "bn": [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)],
            "first": layers[:1],
            "head": [model.get_submodule(n) for n in getattr(model, "head_layers", ())],
            "conv": [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]}


def keep_float32(model, recipe):
    """Mark the modules of the recipe's kept MODULE_PARTS to run in float32 under autocast: a forward pre-hook
    turns autocast off and casts the floating inputs to float32, a forward hook turns it back on. Hooks, not a
    wrapper: the state dict, deepcopy and the module tree stay as they are. Returns `model`."""
    if not recipe or base(recipe) == "fp32":
        return model
    chosen = {id(m): m for part, ms in module_parts(model).items() if keeps(recipe, part) for m in ms}
    for m in chosen.values():
        m.register_forward_pre_hook(_enter_float32)
        m.register_forward_hook(_leave_float32, always_call=True)
    return model


_left = []   # the autocast contexts that kept modules have turned off, innermost last


def _enter_float32(module, args):
    device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
    ctx = torch.autocast(device, enabled=False)
    ctx.__enter__()
    _left.append(ctx)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _leave_float32(module, args, output):
    _left.pop().__exit__(None, None, None)


# ---- runconfig ---------------------------------------------------------------------------------
# What defines a run: its options (RunConfig), where it lives, the options both training scripts take, its schedule.
#
# A run is a RunConfig: the options that define it. Every checkpoint holds it with the facts the run learned from
# its data (`inputs`), and a checkpoint whose identity (IDENTITY_KEYS) differs from a run's is refused: resuming,
# predicting and ensembling never mix two runs. The schedule is Table 1's on real data, the demo's on the
# built-in synthetic cohorts (each training script's defaults), with a learning rate per epoch (learning_rate).

SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "lr_schedule")
SCHEDULE_TYPES = {"epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "lr_schedule": str}
LR_SCHEDULES = ("constant", "cosine")   # constant: Table 1's; cosine: the brain-age demo's (learning_rate)
# a checkpoint belongs to a run when these match (epochs may grow on --resume; the data may move, but its
# content is compared: the table's sha256 and the images' fingerprint, see data.table_sha256, image_fingerprint)
DATA_KEYS = ("task", "model", "split_seed", "fold", "version", "classes", "group_map", "n_tabular",
             "tabular_columns", "embedding_dim", "train_sex", "split", "table_sha256")
IDENTITY_KEYS = DATA_KEYS + ("loss", "batch_size", "lr", "weight_decay", "lr_schedule", "images_sha256", "image_shape",
                             "crops",
                             "target_scale",   # brain age: what its network regresses (models.AgeTarget)
                             "precision")      # the arithmetic it trained in (resolve_precision)


# ----------------------------------------------------------------------------------------------
# What defines a run, and where it lives

@dataclass(frozen=True)
class RunConfig:
    """The options that define one run of either task; fields that belong to the other task are None."""
    task: str                        # "ad" or "brain-age"
    model: str
    version: int                     # the initialisation seed (Sec. 4.3.6 "versions")
    split_seed: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    data_csv: str                    # as given; the built-in synthetic cohort's is absolute
    image_dir: str = None
    cache_dir: str = None            # None: <csv folder>/cache (data.cache_folder)
    cache_dtype: str = "float16"
    fold: int = None                 # AD: the validation subset, 0..3
    classes: int = None              # AD: 3, or 2 for CN vs AD (App. B)
    loss: str = None                 # AD: "wce" (Eq. 5), "ce" or "ce-oversample" (App. C.4)
    crops: str = None                # AD: crops.json (None: next to the CSV, else the MNI152 boxes)
    group_map: dict = None           # AD: extra Group values read as a diagnosis, {"SMC": "CN"}
    embedding_dim: int = None        # brain age: the sex embedding 2->1 or 2->2
    train_sex: str = None            # brain age: "all", or Fig. 4A's "M", "F", "mixed"
    split: tuple = None              # brain age: train/val/test fractions (None: Sec. 4.2.3's 80/10/10)
    precision: str = None            # a recipe of precision.py ("fp32", "bf16", ...); None: a run from before
    lr_schedule: str = None          # "constant" or "cosine" (learning_rate); None: constant, a run from before

    def run_dir(self, out):
        if self.task == "ad":
            return ad_run_dir(out, self.model, self.split_seed, self.version, self.fold, self.classes == 2)
        return brain_age_run_dir(out, self.model, self.version, self.embedding_dim, self.train_sex)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def build_model(self, inputs):
        """The run's network (models.build_model) for the inputs it was trained on, with the parts its precision
        recipe keeps in float32 marked so (keep_float32)."""
        return keep_float32(build_model(self.task, self.model, image_shape=inputs.get("image_shape"),
                                        n_tabular=inputs["n_tabular"], n_classes=self.classes or 3,
                                        embedding_dim=self.embedding_dim), self.precision)


def ad_run_dir(out, model, split_seed, version, fold, binary=False):
    """Where one AD run lives: <out>/ad[-binary]/<model>/seed<S>/v<V>/fold<F>."""
    return os.path.join(out, "ad-binary" if binary else "ad", model, f"seed{split_seed}", f"v{version}", f"fold{fold}")


def brain_age_run_dir(out, model, version, embedding_dim=1, train_sex="all"):
    """Where one brain-age run lives: <out>/brain-age/<model>[-emb2][-train<M|F|mixed>]/v<V>."""
    folder = model + (f"-emb{embedding_dim}" if embedding_dim not in (None, 1) else "") + \
        (f"-train{train_sex}" if train_sex not in (None, "all") else "")
    return os.path.join(out, "brain-age", folder, f"v{version}")


def identity(run, inputs, keys=IDENTITY_KEYS):
    """The values of `keys` that a checkpoint of this run must hold (run options and data facts)."""
    flat = {**dataclasses.asdict(run), **inputs}
    return {k: flat.get(k) for k in keys}


# ----------------------------------------------------------------------------------------------
# Command line and schedule

def add_common_arguments(p):
    """The options both training scripts take (run-defining ones and those of this invocation alone)."""
    p.add_argument("--version", type=int, default=0, help="initialisation seed (Sec. 4.3.6 'versions')")
    p.add_argument("--data-csv", help="the table; default: the built-in synthetic cohort")
    p.add_argument("--image-dir", help="folder of <Subject>.nii.gz (default: <csv folder>/images)")
    p.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    p.add_argument("--crops", help="crops.json with the hippocampus boxes (default: next to the CSV)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    for k in SCHEDULE_KEYS:
        p.add_argument("--" + k.replace("_", "-"), type=SCHEDULE_TYPES[k], help="default: Table 1, or the demo",
                       **({"choices": LR_SCHEDULES} if k == "lr_schedule" else {}))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", metavar="{auto,fp32,bf16,fp16}",
                   help="auto: float32 until a faster recipe is shown as accurate on this kind of device "
                        "(AUTO); bf16, fp16 (CUDA), or a recipe such as bf16+fp32:hyper,bn")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default: min(8, cores / processes on this machine) on CUDA, 0 on CPU)")
    p.add_argument("--decode-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode the image cache on first use (default: min(8, cores))")
    p.add_argument("--sync-bn", action="store_true", help="torchrun: batch norms over the whole batch (SyncBatchNorm)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (unmeasured on GPU here)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last_3d memory format (unmeasured on GPU here)")
    p.add_argument("--images-on-device", action="store_true",
                   help="keep the run's decoded images on the training device and batch them there, no loader "
                        "(unmeasured on GPU here)")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def check_options(args):
    """Numeric options within their range, refused naming the option (argparse only checks the type)."""
    for k, least in (("epochs", 1), ("batch_size", 1), ("weight_decay", 0), ("workers", 0), ("version", 0),
                     ("split_seed", 0)):
        check_number("--" + k.replace("_", "-"), args.get(k), least=least)
    check_number("--lr", args.get("lr"), above=0)


def resolve_schedule(args, defaults, name, quiet=False):
    """Unset schedule options from `defaults` (Table 1 on real data, the demo schedule on synthetic)."""
    check_options(args)
    schedule = {k: args[k] if args[k] is not None else defaults[k] for k in SCHEDULE_KEYS}
    log(f"schedule ({name}): " + ", ".join(f"{k} {schedule[k]}" for k in SCHEDULE_KEYS), quiet)
    return schedule


def learning_rate(run, epoch):
    """The learning rate of `epoch` (0-based): run.lr throughout ("constant", Table 1), or a cosine from run.lr
    down towards 0 over run.epochs ("cosine": the brain-age demo's, so that its last epochs settle instead of
    moving the validation MAE by a year or more from one epoch to the next)."""
    if run.lr_schedule == "cosine":
        return run.lr * 0.5 * (1 + math.cos(math.pi * epoch / run.epochs))
    return run.lr


# ---- runfolder ---------------------------------------------------------------------------------
# A run folder holds one run, always: claimed by one live process at a time, refused to a new run while it holds one.
#
# The training scripts claim their run's folder (`claim_run_folder`) before they decode, train or write
# anything, and hold it until the run ends, however it ends. A run folder is what predict.py, evaluate.py
# and run-protocol read a run from (runs.finished: its metrics.json), so a second run's checkpoints beside
# a first run's metrics would be taken for a finished run that never was.

try:
    import fcntl
except ImportError:  # not on Windows: run folders are not locked there (lock_folder warns)
    fcntl = None



FINISHED_FILES = ("metrics.json", "predictions.npz", "logits.npz", "calibration.json")  # its final best.pt's
RUN_FILES = ("best.pt", "last.pt", "log.csv") + FINISHED_FILES                          # what a run writes
LOCK_NAME = ".lock"


@contextlib.contextmanager
def claim_run_folder(run_dir, resume):
    """run_dir for this run alone while the block runs: a run folder holds one run, always.

    Refused (UserError, before anything is decoded, trained or written):
    - a folder in use by a live process: a run holds an exclusive flock on <run_dir>/.lock while it
      runs (under torchrun, rank 0 does), and the OS drops it when the process ends however it ends,
      kill -9 included, so a dead run never leaves its folder locked;
    - without --resume, a folder that holds a run's files, finished (metrics.json) or not (last.pt):
      a new run would leave its checkpoints beside the old run's metrics and predictions, which
      predict.py and evaluate.py would then take for its own. Refused rather than moved aside: which
      run to keep is the user's to say (--resume continues it, another --out starts a new one);
    - with --resume, a folder with no last.pt to continue but another run's files.
    With --resume, fit removes a finished run's metrics.json and predictions.npz before it trains it
    further. On release the lock file goes, and the folders this created if they are still empty."""
    fd, created, refusal = None, [], None
    try:
        if is_main():
            created = make_folders(run_dir)
            fd, holder = lock_folder(run_dir)
            if fd is None and holder is not None:
                refusal = f"{run_dir}: in use by another training process ({holder}); wait for it to end, or " \
                          f"use another --out"
            else:
                refusal = occupied(run_dir, resume)
        refusal = first_reported(refusal)      # torchrun: rank 0's verdict is every process's
        if refusal:
            raise UserError(refusal)
        yield
    finally:
        release_folder(run_dir, fd, created)


def occupied(run_dir, resume):
    """Why run_dir cannot take a new run (without --resume) or be resumed (with it), in words; None if it can."""
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(run_dir, f))]
    if not held or resume and "last.pt" in held:
        return None
    if resume:
        return f"{run_dir}: --resume: no last.pt to continue from, and the folder holds another run's " \
               f"{', '.join(held)}; use another --out, or delete them"
    if "metrics.json" in held:
        what, hint = f"a finished run ({', '.join(held)})", "use --resume to train it further (a larger --epochs)"
    elif "last.pt" in held:
        what = f"an unfinished run ({saved_epoch(os.path.join(run_dir, 'last.pt'))})"
        hint = "use --resume to continue it"
    else:
        what, hint = f"another run's {', '.join(held)}", "delete them"
    return f"{run_dir}: holds {what}, and a new run would mix with it; {hint}, or use another --out for the new run"


def saved_epoch(path):
    """'last.pt after epoch N' of a checkpoint, or its bare name when it cannot be read."""
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
        return f"{os.path.basename(path)} after epoch {epoch + 1}"
    except Exception:
        return os.path.basename(path)


def make_folders(run_dir):
    """os.makedirs(run_dir) -> the folders it created, deepest first (release_folder removes them if left empty)."""
    created, d = [], os.path.abspath(run_dir)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(run_dir, exist_ok=True)
    return created


def lock_folder(run_dir):
    """An exclusive flock on <run_dir>/.lock, with this process's id written in it -> (fd, None); (None, "pid
    N on HOST") when a live process holds it; (None, None), with a warning, where the file system has no locks.

    The file is removed on release (release_folder), so a process that opened it just before may lock a
    removed file: the lock counts only when the name still leads to the file locked, else it is taken again."""
    path = os.path.join(run_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(0, "no fcntl on this system")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return None, holder or "a process that has just started"
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            warn(f"{run_dir}: cannot lock the run folder ({exc.strerror}): a second run into it would not be refused")
            return None, None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd, None


def release_folder(run_dir, fd, created):
    """The lock of lock_folder dropped and its file removed; the folders make_folders created removed if empty."""
    if fd is not None:
        path = os.path.join(run_dir, LOCK_NAME)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.remove(path)                      # still locked: no one else can have taken it
        os.close(fd)
    for d in created:
        try:
            os.rmdir(d)
        except OSError:                              # not empty (the run wrote in it), or gone
            break


def discard_finished_outputs(run_dir):
    """A finished run resumed to train further: its metrics.json (first: finished reads it) and
    predictions.npz describe a best.pt that is about to change, so they go (rank 0 removes them); the run writes
    them anew when it ends. -> a line saying so, or None when there were none."""
    gone = [f for f in FINISHED_FILES if os.path.isfile(os.path.join(run_dir, f))]
    if is_main():
        for f in gone:
            os.remove(os.path.join(run_dir, f))
    return f"{run_dir}: trains further: {' and '.join(gone)} of the finished run removed until it ends" if gone \
        else None



# ----------------------------------------------------------------------------------------------
# Device, randomness, loaders

def setup_device(name):
    """auto: CUDA when present. On CUDA, cudnn.benchmark (fixed input shapes). Under torchrun, joins the
    process group (init) and, on CUDA, takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if launched():
            if local_rank() >= torch.cuda.device_count():
                raise UserError(f"--nproc_per_node: process {local_rank()} has no GPU of its own "
                                f"({torch.cuda.device_count()} visible)")
            device = torch.device("cuda", local_rank())
            torch.cuda.set_device(device)
    init(device.type)
    return device


def loader_workers(requested, device):
    """--workers, else on CUDA min(8, cores / processes on this machine) (decoding overlaps the GPU) and 0 on
    CPU (the cores train)."""
    if requested is not None:
        return requested
    return min(8, (os.cpu_count() or 1) // local_world_size()) if device.type == "cuda" else 0


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches of `dataset`; a shuffled training loader drops a last partial batch (one drawn by a sampler,
    --loss ce-oversample, keeps it, as DeviceBatches does).

    Under torchrun each process reads its share (shard, re-shuffled by fit every epoch) in
    batches of batch_size / N, so a step still sees batch_size samples."""
    drop_last = shuffle and len(dataset) > batch_size
    if world_size() > 1:
        sampler, batch_size = shard(dataset, shuffle, sampler), local_batch(batch_size)
        shuffle, drop_last = False, drop_last and len(sampler) > batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                                       persistent_workers=workers > 0)


def to_device(image, device):
    """A batch's images on the device in float32. Loaders ship them as the image cache stores them (float16 by
    default, data.image_tensor), so the upcast, exact, happens on the device after the copy."""
    return image.to(device, non_blocking=True).float()


class DeviceBatches:
    """A dataset's items put once on the training device and batched there: no loader, no copies
    (--images-on-device; the AD crops of 2,120 subjects in float16 are about 3.3 GB, brain age's 21,353 training
    scans of 90x120x99 about 44 GB).

    Images are kept in float16 and handed out as float32 batches: one float16 tensor is allocated on the device
    and filled item by item, so the host never holds the set (a float32 stack of the brain-age cohort would
    need about 88 GB of host memory before its conversion). pick_side: the items hold both hippocampi,
    (2, 1, D, H, W), and every training batch draws one side per sample on the device (Sec. 4.3.6), as
    ADDataset does per item. Batches are shuffled with the seeded global generator, or drawn by the sampler
    make_loader would use; ordered(): the same tensors in order (precise BN).

    Under torchrun a process holds its share alone, fixed for the run: the items DistributedSampler deals it
    in order (every N-th, padded), so N processes hold the cohort once between them. Each epoch it shuffles,
    or draws the weighted sampler over, that share; the loader path instead re-deals the whole set each epoch."""

    def __init__(self, dataset, batch_size, device, shuffle=False, sampler=None, pick_side=False):
        self.dataset, self.pick_side = dataset, pick_side
        self.held = list(shard(dataset, shuffle=False)) if world_size() > 1 \
            else list(range(len(dataset)))                                      # dataset indices held here
        first = dataset[self.held[0]]
        self.image = torch.empty((len(self.held), *first[0].shape), dtype=torch.float16, device=device)
        tabular, target = [], []                                                 # image (n, [2,] 1, D, H, W)
        for k, i in enumerate(self.held):
            image, tab, tgt = first if k == 0 else dataset[i]
            self.image[k] = torch.as_tensor(image).to(torch.float16).to(device, non_blocking=True)
            tabular.append(tab)
            target.append(tgt)
        self.tabular, self.target = torch.stack(tabular).to(device), torch.stack(target).to(device)
        self.order(batch_size, shuffle, sampler)

    def order(self, batch_size, shuffle=False, sampler=None):
        """How the held items are drawn: shuffled, by a sampler (restricted to them), or in order."""
        self.requested_batch = batch_size
        n = len(self.held)
        if world_size() > 1:
            batch_size = local_batch(batch_size)
            if sampler is not None:                              # the same weighted draw over this share
                weights = torch.as_tensor(sampler.weights)[self.held]
                sampler = torch.utils.data.WeightedRandomSampler(weights, n, sampler.replacement)
        self.sampler = sampler or (torch.utils.data.RandomSampler(range(n)) if shuffle else range(n))
        self.batch_size = batch_size
        self.drop_last = shuffle and n > batch_size                  # as make_loader's

    def ordered(self):
        """The same items on the device, each once and in order (this process's share under torchrun): the
        precise-BN pass over the training set without a second copy of it."""
        view = copy.copy(self)
        view.order(self.requested_batch)
        return view

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = torch.as_tensor(list(self.sampler), device=self.image.device)
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            b = idx[start:start + self.batch_size]
            image = self.image[b]
            if self.pick_side:                                   # (B, 2, 1, D, H, W) -> (B, 1, D, H, W)
                image = image[torch.arange(len(b), device=b.device), torch.randint(2, (len(b),), device=b.device)]
            yield image.float(), self.tabular[b], self.target[b]


def batches(dataset, batch_size, workers, device, on_device=False, shuffle=False, sampler=None, pick_side=False):
    """The batches of a dataset: a DataLoader (make_loader), or DeviceBatches with on_device."""
    if on_device:
        return DeviceBatches(dataset, batch_size, device, shuffle, sampler, pick_side)
    return make_loader(dataset, batch_size, workers, device, shuffle, sampler)


@torch.no_grad()
def recalibrate_batchnorm(model, loader, device, precision="fp32"):
    """"Precise BN": every BatchNorm's running statistics re-estimated over `loader` (the training set,
    in order) with the current weights, as a plain average over its batches (momentum None); the
    weights do not change. Evaluation reads running statistics, and with a high learning rate and
    small batches the moving averages lag the weights so far that a validation score jumps by
    epochs (brain age: MAE 20.2 with the epoch's running statistics, 5.4 re-estimated, same weights).
    Under torchrun each process averages its share, then the processes' statistics are averaged."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for image, tabular, _ in loader:
        with autocast(device, precision, "precise-bn"):
            model(to_device(image, device), tabular.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    average([b for m in norms for b in (m.running_mean, m.running_var)])
    model.train(was_training)


@torch.no_grad()
def predict(model, loader, device, transform=None, precision="fp32", on_batch=None, sides=False):
    """Every item of a loader through the model in eval mode -> (outputs (N, ...), targets (N,)) as numpy.
    on_batch(n), if given, is told each batch's n items once they are through (predict.py's progress).

    `transform` maps the network's output (softmax for AD, AgeTarget.decode for brain age). An item
    that holds both hippocampi, image (B, 2, 1, D, H, W), is read as 2B images and the transformed
    outputs of its two sides are averaged (Sec. 4.3.6), or with `sides` kept: (N, 2, ...) (what temperature
    scaling fits its logits on, calibration.py). Under torchrun every process predicts its share
    and gets everyone's back, in dataset order (gather)."""
    model.eval()
    outputs, targets = [], []
    for image, tabular, target in loader:
        tabular = tabular.to(device, non_blocking=True)
        both = image.dim() == 6
        if both:
            B = image.shape[0]
            image, tabular = image.flatten(0, 1), tabular.repeat_interleave(2, 0)    # (2B, 1, D, H, W)
        with autocast(device, precision, "eval"):
            out = model(to_device(image, device), tabular).float()
        out = transform(out) if transform is not None else out
        if both:
            out = out.view(B, 2, *out.shape[1:])                                     # (B, 2, ...)
            out = out if sides else out.mean(1)                                      # (B, ...)
        outputs.append(out.cpu())
        targets.append(target.cpu())
        if on_batch is not None:
            on_batch(len(target))
    n = len(loader.dataset)
    return gather(torch.cat(outputs).numpy(), n), gather(torch.cat(targets).numpy(), n)


class NonFiniteOutputs(UserError):
    """A model's outputs hold NaN or inf (check_finite_outputs): diverged weights, or absurd inputs."""

    def __init__(self, detail):
        super().__init__(f"the model's outputs are {detail}")
        self.detail = detail


def check_finite_outputs(outputs):
    """outputs (N, ...) as they are, or NonFiniteOutputs saying for how many of the N subjects they are NaN or inf
    (a metric of them would be a scikit-learn traceback, or a number that means nothing)."""
    bad = ~np.isfinite(outputs).reshape(len(outputs), -1).all(1)
    if bad.any():
        raise NonFiniteOutputs(f"{'nan' if np.isnan(outputs).any() else 'inf'} for {int(bad.sum())} of "
                               f"{len(bad)} subjects")
    return outputs


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(obj, path):
    """Atomic: a temporary file, then a rename, so an interruption never leaves half a checkpoint. Serialised in
    memory first, so a full disk is one error naming the folder and the bytes it needed (torch.save onto a
    file would fail inside its C++ writer with a traceback)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(buf.getbuffer(), path)


def load_checkpoint(path, expected=None):
    """Load a checkpoint of ours; a corrupt file, or one whose identity differs from `expected`
    ({key: value} of run options and data facts), stops with a clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}); "
                        f"delete it to start the run afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "run", "inputs", "epoch"} <= set(ckpt):
        raise UserError(f"{path}: not a checkpoint written by this version of the code")
    if expected:
        held = {**ckpt["run"], **ckpt["inputs"]}
        diff = [f"{k}: checkpoint {held.get(k)!r}, now {v!r}" for k, v in expected.items() if held.get(k) != v]
        if diff:
            data = [k for k in ("table_sha256", "images_sha256") if held.get(k) != expected.get(k, held.get(k))]
            hint = f"; it was trained on other data: {held.get('data_csv')}" if data else ""
            raise UserError(f"{path}: checkpoint belongs to another run ({'; '.join(diff)}){hint}")
    return ckpt


def load_weights(module, state, path, what="model"):
    """module.load_state_dict(state), with tensors of other shapes or names refused in one line naming `path`."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise UserError(f"{path}: the saved {what} does not fit this run's ({detail})") from None


def resumable(run_dir, resume):
    """--resume and a last.pt to resume from."""
    return resume and os.path.isfile(os.path.join(run_dir, "last.pt"))


# ----------------------------------------------------------------------------------------------
# The loop

def speed_options(args):
    """The options of `fit` that belong to this invocation, not to the run's identity: how it trains."""
    return {k: args[k] for k in ("sync_bn", "compile", "channels_last")}


# Diverged though finite: an epoch's mean training loss over LOSS_BOUND times the untrained network's
# (its first batch, before any step). A network that learns stays within a few times its starting loss
# (cross-entropy starts near log C, brain age's MSE near the variance of its scaled target), while one a
# million times worse has weights blown up past recovery: --lr 1e3 on the AD cohort gives 2e9 in the
# tabular MLP's first epoch, 1e17 in HyperFusion's, and the epochs after it learn nothing (chance-level
# validation). A fixed bound would depend on the loss's units; this one is relative to the run's own start.
LOSS_BOUND = 1e6


def fit(model, train_loader, loss_fn, validate, score_key, run, run_dir, inputs, state=None, resume=False,
        quiet=False, lower_is_better=False, sync_bn=False, compile=False, channels_last=False, before_validation=None,
        weight_decay=None):
    """The hand-written training loop of both tasks.

    Adam with weight decay lambda on every trained parameter, internal and hypernetwork alike
    (Eq. 3: the generated weights are not parameters, so they are not decayed). lambda is
    run.weight_decay unless `weight_decay` is given (brain age: rescaled to its target, AgeTarget). Each epoch's
    randomness (shuffling, dropout, the hippocampus side) is seeded from (version, epoch), so a run
    resumed from last.pt ends exactly as an uninterrupted one on CPU. Keeps the best epoch by
    validate(model)[score_key]; writes best.pt and last.pt (each with the run, its data facts `inputs`
    and the run's saved `state`, such as its tabular preprocessing) and log.csv in run_dir every epoch.
    before_validation(model), if given, runs each epoch before validate (brain age: recalibrate_batchnorm).
    -> {"epoch", "score", "metrics"} of the best epoch.

    resume continues last.pt (its run must be this one, epochs excepted: --epochs may grow, not shrink); when
    it trains further, a finished run's metrics.json and predictions.npz are removed first, so that a
    half-trained best.pt is never taken for a finished run's (finished). Divergence stops the run with a
    UserError naming the epoch and what went non-finite (check_divergence), before that epoch is saved: last.pt
    and best.pt keep the last good epoch. A KeyboardInterrupt (Ctrl-C, or SIGTERM as data.Terminated)
    goes on up with `progress`, what last.pt holds, for data.run_cli's one line.

    Under torchrun (distributed.py) the model trains inside DDP (SyncBatchNorm with sync_bn), each
    process on its share of the batch and with its own dropout draws; rank 0 alone writes. The
    speed options: channels_last (channels_last_3d memory format) and compile (torch.compile).
    """
    os.makedirs(run_dir, exist_ok=True)
    device = next(model.parameters()).device
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    model, net = wrap(model, device, sync_bn)   # net trains; model is saved and validated
    net = torch.compile(net) if compile else net
    decay = run.weight_decay if weight_decay is None else weight_decay
    opt = torch.optim.Adam(model.parameters(), lr=run.lr, weight_decay=decay)           # Eq. 3
    scaler = torch.amp.GradScaler("cuda", enabled=base(run.precision) == "fp16")  # bfloat16 needs no loss scaling
    start, best, history, initial = 0, None, [], None
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if resumable(run_dir, resume):
        ckpt = load_checkpoint(last_path, identity(run, inputs))
        load_weights(model, ckpt["model"], last_path)
        load_weights(opt, ckpt["optimizer"], last_path, "optimiser state")
        if ckpt.get("scaler"):   # float16: the loss scale continues where it was
            scaler.load_state_dict(ckpt["scaler"])
        start, best, history, initial = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"], ckpt.get("initial_loss")
        if start > run.epochs:
            raise UserError(f"--epochs {run.epochs}: {last_path} has trained {start} epochs already; --resume "
                            f"continues that run, so --epochs may grow but not shrink")
        log(f"resuming {last_path} after epoch {start}", quiet)
        if start < run.epochs:
            gone = discard_finished_outputs(run_dir)
            if gone:
                log(gone, quiet)
    elif resume:
        log(f"--resume: no {last_path} yet, starting afresh", quiet)
    header = {"run": dataclasses.asdict(run), "inputs": inputs, **(state or {})}
    pace, saved = Progress("epochs", run.epochs - start, quiet=True), start - 1  # saved: the epoch last.pt holds
    try:
        for epoch in range(start, run.epochs):
            t0 = time.time()
            torch.manual_seed(run.version * 1_000_003 + epoch + 7_919 * rank())
            for group in opt.param_groups:
                group["lr"] = learning_rate(run, epoch)
            if hasattr(train_loader.sampler, "set_epoch"):        # torchrun: a new shuffle, the same on all ranks
                train_loader.sampler.set_epoch(run.version * 1_000_003 + epoch)
            total, n, first, problem = train_epoch(net, opt, scaler, train_loader, loss_fn, device, channels_last,
                                                   run.precision or "fp32")
            total, n, first = sum_all(total, n, first)
            if initial is None and epoch == 0:                    # the untrained network's loss (LOSS_BOUND)
                initial = first / world_size()
            mean_loss = total / max(n, 1)
            if problem is None and initial is not None and initial > 0 and mean_loss > LOSS_BOUND * initial:
                problem = f"the training loss {mean_loss:.3g} is over {LOSS_BOUND:g} times the untrained " \
                          f"network's ({initial:.3g})"
            check_divergence(problem, epoch, run_dir, saved)
            check_divergence(non_finite(model), epoch, run_dir, saved, "after the epoch's steps")
            if before_validation is not None:
                before_validation(model)
                check_divergence(non_finite(model), epoch, run_dir, saved, "after the precise-BN re-estimation")
            try:
                metrics = validate(model)
            except NonFiniteOutputs as exc:
                check_divergence(f"the validation outputs are {exc.detail}", epoch, run_dir, saved)
            score = metrics[score_key]
            if not math.isfinite(score):
                check_divergence(f"the validation score ({score_key}) is {score}", epoch, run_dir, saved)
            improved = best is None or (score < best["score"] if lower_is_better else score > best["score"])
            if improved:
                best = {"epoch": epoch, "score": score, "metrics": metrics}
            seconds = time.time() - t0
            history.append({"epoch": epoch + 1, "train_loss": mean_loss, score_key: score, "seconds": seconds,
                            "lr": opt.param_groups[0]["lr"],
                            **{k: v for k, v in metrics.items() if isinstance(v, float) and k != score_key}})
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "best": best,
                     "history": history, "initial_loss": initial, **header}
            if is_main():
                if improved:
                    save_checkpoint(state, best_path)
                save_checkpoint(state, last_path)
            saved = epoch                                         # what last.pt holds from now on
            if is_main():
                write_log(history, os.path.join(run_dir, "log.csv"))
            pace.advance()                                        # its time left: the pace of this call's epochs
            left = pace.left()
            log(f"epoch {epoch + 1:3d}/{run.epochs} | train loss {mean_loss:.4f} | "
                f"val {score_key.replace('balanced_accuracy', 'BA')} {score:.3f}{' *' if improved else '  '} | "
                f"{seconds:.1f} s | {left / 60:.1f} min left", quiet)
    except KeyboardInterrupt as exc:          # Ctrl-C or SIGTERM: data.run_cli says what is kept, in one line
        if not hasattr(exc, "progress"):                          # the epoch after the saved one was training
            when = f"in epoch {saved + 2}" if saved + 1 < run.epochs else f"after epoch {run.epochs}"
            exc.progress = f"{when} of {run.epochs}: " + (
                f"{last_path} holds epoch {saved + 1}" if saved >= 0 else f"nothing saved yet in {run_dir}")
        raise
    barrier()                                         # best.pt is written before anyone reads it
    if best is None:
        raise UserError(f"{run_dir}: no epoch was trained (--epochs {run.epochs})")
    return best


# How often a training epoch on a GPU reads its losses back (a host sync): every step would make the host wait for
# each forward pass before it even launches the backward, idling a GPU whose steps take a few milliseconds
GPU_SYNC_EVERY = 32


def train_epoch(net, opt, scaler, loader, loss_fn, device, channels_last=False, precision="fp32", sync_every=None):
    """One pass of Adam steps over the training batches -> (loss total, samples, first batch's loss, problem).

    The losses stay on the device: their sum, the first batch's and the first non-finite one with its step,
    read back every `sync_every` steps (default: every step on a CPU, where reading costs nothing, every
    GPU_SYNC_EVERY on a GPU) and at the end. problem: None, or "the training loss is nan (step k of K)" at the
    first non-finite loss; alone, the epoch stops at the next read (on a CPU before that step is taken; on a GPU
    up to sync_every - 1 poisoned steps later, which changes nothing: a diverged epoch is never saved, last.pt
    keeps the last good one). Under torchrun the others would wait for this process's gradients, so it goes on,
    its non-finite gradients reach every process, and all stop after the epoch."""
    net.train()
    every = sync_every or (GPU_SYNC_EVERY if device.type == "cuda" else 1)
    total, first, n = torch.zeros((), dtype=torch.float64, device=device), None, 0
    bad_step, bad_value = torch.full((), -1, device=device), torch.zeros((), device=device)
    for step, (image, tabular, target) in enumerate(loader):
        image = to_device(image, device)
        if channels_last and image.dim() == 5:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        tabular, target = tabular.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, precision):
            out = net(image, tabular)
        with autocast(device, precision, "loss"):
            loss = loss_fn(out.float() if keeps(precision, "loss") else out, target)
        value = loss.detach().float()
        first = value if first is None else first
        newly = ~torch.isfinite(value) & (bad_step < 0)                    # on the device: no sync
        bad_step, bad_value = torch.where(newly, step, bad_step), torch.where(newly, value, bad_value)
        if (step + 1) % every == 0 and world_size() == 1 and int(bad_step) >= 0:
            break
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total, n = total + value.double() * len(target), n + len(target)
    problem = None
    if int(bad_step) >= 0:
        problem = f"the training loss is {float(bad_value)} (step {int(bad_step) + 1} of {len(loader)})"
    return float(total), n, float(first) if first is not None else 0.0, problem


def non_finite(model):
    """The first parameter or BatchNorm running statistic of `model` that holds NaN or inf, in words; else None."""
    tensors = [(f"parameter {k}", p) for k, p in model.named_parameters()]
    tensors += [(f"BatchNorm running statistic {name}.{k}", getattr(m, k)) for name, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for k in ("running_mean", "running_var") if getattr(m, k) is not None]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors]).cpu()    # one device sync
    if bool(finite.all()):
        return None
    name, t = tensors[int((~finite).nonzero()[0])]
    return f"the {name} is {'nan' if torch.isnan(t).any() else 'inf'}"


def check_divergence(problem, epoch, run_dir, saved, when=""):
    """A UserError naming the epoch and `problem` (what went non-finite) if any process reports one, else
    nothing. Raised before the epoch is saved, so last.pt and best.pt keep the last good epoch."""
    problem = first_reported(problem)
    if problem is None:
        return
    kept = f"last.pt still holds epoch {saved + 1}, the last good one" if saved >= 0 else "nothing was saved"
    raise UserError(f"{run_dir}: training diverged in epoch {epoch + 1}: {problem}{' ' + when if when else ''}; "
                    f"{kept}. Lower --lr (or look for extreme values in the inputs) and train again"
                    + (" into another --out" if saved >= 0 else ""))


def write_log(history, path):
    write_csv(history, list(dict.fromkeys(k for row in history for k in row)), path)


# ---- runs --------------------------------------------------------------------------------------
# A finished run read back: what defined it, its trained model, and the saved state it predicts with.
#
# Evaluation (the tables), the test-time sweep and prediction all go through load_run, so a run is
# always replayed with its own state: the tabular preprocessing with its imputation (Sec. 3.3), the
# hippocampus boxes, the image shape and the brain-age target scale, all stored in its checkpoint, and for AD
# the temperature it was calibrated with (calibration.json).

CALIBRATION_FILE = "calibration.json"   # an AD run's temperature and its validation calibration (calibration.py)


def finished(run_dir):
    """A run is finished when its metrics.json exists (written last, atomically, by the training scripts)."""
    return os.path.isfile(os.path.join(run_dir, "metrics.json"))


@dataclass
class FinishedRun:
    """One trained run: its folder, its best.pt, the RunConfig and data facts (`inputs`) stored there."""
    dir: str
    checkpoint_path: str
    checkpoint: dict
    run: RunConfig
    inputs: dict

    @property
    def config(self):
        """Run options and data facts in one flat dict, for comparing runs before they are ensembled."""
        return {**dataclasses.asdict(self.run), **self.inputs}

    @property
    def class_names(self):
        return list(self.inputs.get("class_names") or CLASS_NAMES[:self.run.classes or 3])

    @property
    def tabular(self):
        """AD: the TabularPreprocessor fitted on the run's training rows; brain age: None."""
        state = self.checkpoint.get("tabular")
        return TabularPreprocessor(state=state) if state is not None else None

    @property
    def crops(self):
        """AD image models: the hippocampus boxes the run was trained with; otherwise None."""
        boxes = self.inputs.get("crops")
        return HippocampusCrops(**boxes) if boxes else None

    @property
    def target(self):
        """Brain age: the AgeTarget that turns the network's output into years; AD: None."""
        t = self.checkpoint.get("target")
        return AgeTarget(**t) if t is not None else None

    def model(self, device="cpu"):
        """The trained network, in eval mode on `device`."""
        model = self.run.build_model(self.inputs)
        load_weights(model, self.checkpoint["model"], self.checkpoint_path, f"{self.run.model} model")
        return model.to(device).eval()

    def read_metrics(self):
        return self.read_json("metrics.json")

    def read_json(self, name):
        """A JSON file of the run's folder; unreadable is one error naming it."""
        path = os.path.join(self.dir, name)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None

    @property
    def temperature(self):
        """AD: the run's temperature (calibration.json, fitted on its validation set), or None before calibration."""
        path = os.path.join(self.dir, CALIBRATION_FILE)
        if not os.path.isfile(path):
            return None
        t = self.read_json(CALIBRATION_FILE).get("temperature")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise UserError(f"{path}: temperature {t!r} is not a positive number")
        return float(t)

    def read_predictions(self):
        """predictions.npz: the test subjects and the run's soft predictions (AD) or ages (brain age)."""
        path = os.path.join(self.dir, "predictions.npz")
        try:
            with np.load(path, allow_pickle=False) as npz:
                pred = {k: npz[k] for k in npz.files}
        except Exception as exc:  # missing, truncated, not a zip, pickled objects
            raise UserError(f"{path}: missing or unreadable test predictions ({type(exc).__name__})") from None
        if "subjects" not in pred or not ({"probs", "labels"} <= set(pred) or {"pred", "age", "sex"} <= set(pred)):
            raise UserError(f"{path}: not the test predictions of a training run (arrays: {', '.join(pred)})")
        return pred


def load_run(path, expected=None):
    """A run folder, or a checkpoint file in one, -> FinishedRun (best.pt unless a file is named).
    `expected` ({key: value}, see identity) refuses a run that is not the one asked for."""
    path = os.fspath(path)
    checkpoint_path = path if os.path.isfile(path) else os.path.join(path, "best.pt")
    ckpt = load_checkpoint(checkpoint_path, expected)
    try:
        run = RunConfig(**ckpt["run"])
    except TypeError as exc:
        raise UserError(f"{checkpoint_path}: not a run description this code knows ({exc})") from None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    return FinishedRun(folder, checkpoint_path, ckpt, run, dict(ckpt["inputs"]))



# ---- temperature scaling of a run's logits (calibration.json)

LOGITS_FILE = "logits.npz"      # a run's validation and test logits, (N, C) or (N, 2, C) with both hippocampi
T_BOUNDS = (0.01, 100.0)        # the temperatures searched; a fit at a bound says the run is degenerate


def probabilities(logits, temperature=1.0):
    """Logits (N, C), or (N, 2, C) for both hippocampi -> (N, C) probabilities at `temperature`, in float64:
    softmax(z / T) per side (models.class_probabilities), then the sides averaged (Sec. 4.3.6)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = class_probabilities(z.reshape(-1, z.shape[-1]), temperature).reshape(z.shape).numpy()
    return p.mean(1) if p.ndim == 3 else p


def nll(logits, labels, temperature):
    """Mean -log p_label at `temperature` (what the fit minimises; metrics' nll is the same number)."""
    p = probabilities(logits, temperature)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-300, None)).mean())


def fit_temperature(logits, labels):
    """The T that minimises the validation NLL of softmax(logits / T), searched over log T within T_BOUNDS."""
    labels = np.asarray(labels)
    found = minimize_scalar(lambda log_t: nll(logits, labels, math.exp(log_t)), method="bounded",
                            bounds=tuple(math.log(b) for b in T_BOUNDS), options={"xatol": 1e-7})
    return float(math.exp(found.x))


def save_logits(run_dir, val, test):
    """logits.npz of a run: val and test as (logits, labels); the test subjects come from its predictions.npz."""
    with atomic_path(os.path.join(run_dir, LOGITS_FILE)) as tmp:
        np.savez(tmp, val_logits=val[0], val_labels=val[1], test_logits=test[0], test_labels=test[1])


def read_logits(run_dir):
    """-> {"val": (logits, labels), "test": (logits, labels)} from logits.npz, or None when the run has none."""
    path = os.path.join(run_dir, LOGITS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {part: (npz[f"{part}_logits"], npz[f"{part}_labels"]) for part in ("val", "test")}
    except Exception as exc:   # truncated, not a zip, arrays missing
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete it to predict it again") from None


def calibrate(run_dir, outputs):
    """Fit a run's temperature on its validation logits and write calibration.json: the temperature and the
    validation and test calibration before and after. outputs: read_logits' dict. -> that record."""
    T = fit_temperature(*outputs["val"])
    record = {"temperature": T, "fitted_on": "validation", "n_val": int(len(outputs["val"][1])),
              "at_bound": bool(min(abs(math.log(T / b)) for b in T_BOUNDS) < 1e-3)}
    for part, (logits, labels) in outputs.items():
        record[part] = {"before": calibration_metrics(labels, probabilities(logits)),
                        "after": calibration_metrics(labels, probabilities(logits, T))}
    write_json(record, os.path.join(run_dir, CALIBRATION_FILE))
    return record
