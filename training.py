"""What both trainers share: the run's options and folder, the device, many processes, the loop `fit`, checkpoints.

train_ad.py and train_brain_age.py each describe one run (data, model, loss, metric) and hand it to `fit`: Adam with
weight decay (Eq. 3) on the loss of Eq. 4 or Eq. 5. A run is its RunConfig, stored in every checkpoint with the facts
learned from its data (`inputs`), so that a checkpoint of another run is refused and a finished run is replayed
exactly (load_run). Under `torchrun --nproc_per_node N` each process holds the model inside DDP and reads 1/N of
every batch; rank 0 alone prints and writes, and work done once runs on rank 0 first (`main_first`). Without
torchrun every helper below is the single process's no-op.
"""
import atexit
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import minimize_scalar
from torch.nn.parallel import DistributedDataParallel

from data import (CLASS_NAMES, HippocampusCrops, Progress, TabularPreprocessor, UserError, atomic_path, check_number,
                  warn, write_bytes, write_csv, write_json)
from metrics import calibration_metrics
from models import AgeTarget, build_model, class_probabilities

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there (lock_folder warns)
    fcntl = None

# A collective's timeout: the other ranks wait while rank 0 decodes the image cache (26,691 brain-age scans: 24 min)
WAIT_HOURS = 2
_state = {"alone": False}  # True while rank 0 works by itself (see `alone`)


# ----------------------------------------------------------------------------------------------
# Many processes (torchrun, DDP)

def world_size():
    return 1 if _state["alone"] or not dist.is_initialized() else dist.get_world_size()


def rank():
    return 0 if _state["alone"] or not dist.is_initialized() else dist.get_rank()


def is_main():
    """Rank 0: the one process that prints and writes files."""
    return rank() == 0


def log(message, quiet=False):
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


def wrap(model, device, sync_bn=False):
    """-> (model, net): `net` trains (DDP, averaging the gradients), `model` is saved and evaluated. sync_bn: batch
    norms over the whole batch (torch.nn.SyncBatchNorm, CUDA only)."""
    if world_size() == 1:
        return model, model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def everyone(value):
    """Every process's `value`, in rank order (objects: NCCL needs no CUDA tensor here); alone, [value]."""
    if world_size() == 1:
        return [value]
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather(rows, n):
    """Every process's rows of its DistributedSampler share (shuffle off) -> all n rows in dataset order: rank r held
    items r, r + N, ... of the padded order, so interleaving the shares and dropping the padding counts each once."""
    if world_size() == 1:
        return rows
    parts = everyone(rows)
    out = np.empty((sum(len(p) for p in parts),) + rows.shape[1:], rows.dtype)
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out[:n]


def first_reported(value):
    """The first process's value that is not None, on every process: one verdict for all (a refused run folder,
    a divergence), so that no process stops while the others wait for it in a collective."""
    return next((p for p in everyone(value) if p is not None), None)


# ----------------------------------------------------------------------------------------------
# Precision: float32, or one autocast context around the forward pass and the loss

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported(precision, device):
    """Why `device` does not train in `precision`, or None. bfloat16 on a CPU was 0.93x float32's speed here, not
    shown as accurate, and oneDNN's bfloat16 convolution weight gradient is wrong where an input side is shorter than
    the kernel; a GPU before compute capability 8.0 only emulates it."""
    if precision == "fp16" and device.type != "cuda":
        return "float16 with loss scaling is for CUDA; use fp32"
    if precision == "bf16" and device.type != "cuda":
        return "bfloat16 on a CPU is slower than float32 here and its convolution gradients are not exact; use fp32"
    if precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
        return f"{torch.cuda.get_device_name(device)} only emulates bfloat16 (compute capability < 8.0); use fp16"
    return None


def resolve_precision(name, device, quiet=False):
    """--precision -> the run's precision, stored in its identity: auto is fp32 (no faster precision has been shown
    as accurate); one the device cannot do is a UserError naming the option."""
    precision = "fp32" if name == "auto" else name
    if unsupported(precision, device):
        raise UserError(f"--precision {name}: {unsupported(precision, device)}")
    log(f"precision {precision}" + (" (--precision auto)" if name == "auto" else ""), quiet)
    return precision


def replay_precision(trained, device):
    """The precision a finished run is replayed at on `device` (predict.py, evaluate.py): its own where the device
    can do it; float32 otherwise, and for a run from before precision was stored."""
    return trained if trained in PRECISIONS and not unsupported(trained, device) else "fp32"


def autocast(device, precision):
    """The forward pass at `precision`: torch.autocast to bfloat16 / float16, disabled for fp32 (or None)."""
    dtype = PRECISIONS[precision or "fp32"]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------------------------
# What defines a run: its options (RunConfig), where it lives, its schedule

SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "lr_schedule")
SCHEDULE_TYPES = {"epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "lr_schedule": str}
LR_SCHEDULES = ("constant", "cosine")   # constant: Table 1's; cosine: the brain-age demo's (learning_rate)
# a checkpoint belongs to a run when these match (epochs may grow on --resume; the data may move, but its content is
# compared: the table's sha256 and the images' fingerprint, data.table_sha256, data.image_fingerprint)
DATA_KEYS = ("task", "model", "split_seed", "fold", "version", "classes", "group_map", "n_tabular",
             "tabular_columns", "embedding_dim", "train_sex", "split", "table_sha256")
IDENTITY_KEYS = DATA_KEYS + ("loss", "batch_size", "lr", "weight_decay", "lr_schedule", "images_sha256", "image_shape",
                             "crops", "target_scale", "precision")


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
    precision: str = None            # "fp32", "bf16" or "fp16" (resolve_precision); None: a run from before
    lr_schedule: str = None          # "constant" or "cosine" (learning_rate); None: constant, a run from before

    def run_dir(self, out):
        if self.task == "ad":
            return ad_run_dir(out, self.model, self.split_seed, self.version, self.fold, self.classes == 2)
        return brain_age_run_dir(out, self.model, self.version, self.embedding_dim, self.train_sex)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def build_model(self, inputs):
        """The run's network (models.build_model) for the inputs it was trained on."""
        return build_model(self.task, self.model, image_shape=inputs.get("image_shape"), n_tabular=inputs["n_tabular"],
                           n_classes=self.classes or 3, embedding_dim=self.embedding_dim)


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


def cores():
    """The cores this process may run on (its affinity: a container's or a scheduler's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="auto: float32; bf16 (CUDA, compute capability 8.0+) or fp16 (CUDA) autocast")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default: min(8, cores / processes on this machine) on CUDA, 0 on CPU)")
    p.add_argument("--decode-workers", type=int, default=min(8, cores()),
                   help="processes that decode the image cache on first use (default: min(8, cores))")
    p.add_argument("--sync-bn", action="store_true", help="torchrun on CUDA: batch norms over the whole batch")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def resolve_schedule(args, defaults, name, quiet=False):
    """Numeric options checked (naming the option), unset schedule options from `defaults` (Table 1 on real data,
    the demo schedule on the synthetic cohorts)."""
    for k, least in (("epochs", 1), ("batch_size", 1), ("weight_decay", 0), ("workers", 0), ("version", 0),
                     ("split_seed", 0)):
        check_number("--" + k.replace("_", "-"), args.get(k), least=least)
    check_number("--lr", args.get("lr"), above=0)
    schedule = {k: args[k] if args[k] is not None else defaults[k] for k in SCHEDULE_KEYS}
    log(f"schedule ({name}): " + ", ".join(f"{k} {schedule[k]}" for k in SCHEDULE_KEYS), quiet)
    return schedule


def learning_rate(run, epoch):
    """The learning rate of `epoch` (0-based): run.lr throughout ("constant", Table 1), or a cosine from run.lr
    towards 0 over run.epochs ("cosine": the brain-age demo's, so that its last epochs settle)."""
    if run.lr_schedule == "cosine":
        return run.lr * 0.5 * (1 + math.cos(math.pi * epoch / run.epochs))
    return run.lr


# ----------------------------------------------------------------------------------------------
# A run folder holds one run: claimed by one live process at a time, refused to a new run while it holds one

FINISHED_FILES = ("metrics.json", "predictions.npz", "logits.npz", "calibration.json")  # its final best.pt's
RUN_FILES = ("best.pt", "last.pt", "log.csv") + FINISHED_FILES                          # what a run writes
LOCK_NAME = ".lock"


@contextlib.contextmanager
def claim_run_folder(run_dir, resume):
    """run_dir for this run alone while the block runs. Refused before any work: a folder locked by a live process
    (an flock the OS drops however the process ends), and one that holds another run's files (occupied). On release
    the lock file goes, and the folders this created if they are still empty."""
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
        return f"{os.path.basename(path)} after epoch {torch.load(path, 'cpu', weights_only=True)['epoch'] + 1}"
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
    """An flock on <run_dir>/.lock holding "pid N on HOST" -> (fd, None); (None, holder) when a live process holds
    it; (None, None), with a warning, without locks. A lock counts only while the name leads to the file locked."""
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


# ----------------------------------------------------------------------------------------------
# Device, randomness, loaders, evaluation passes

def setup_device(name, sync_bn=False):
    """auto: CUDA when present. TF32 off (float32 means float32 in training, prediction and benchmarks alike);
    cudnn.benchmark on CUDA (fixed input shapes). Under torchrun: joins the process group (NCCL on CUDA, gloo on
    CPU), on CUDA with the GPU of its local rank. sync_bn: refused off CUDA (torch's SyncBatchNorm)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if sync_bn and name != "cuda":
        raise UserError("--sync-bn: torch.nn.SyncBatchNorm is for CUDA; on a CPU each process normalises its share")
    device = torch.device(name)
    launched, local_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1, int(os.environ.get("LOCAL_RANK", "0"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if launched:
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"--nproc_per_node: process {local_rank} has no GPU of its own "
                                f"({torch.cuda.device_count()} visible)")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=WAIT_HOURS))
        atexit.register(dist.destroy_process_group)
    return device


def loader_workers(requested, device):
    """--workers, else on CUDA min(8, cores / processes on this machine) (decoding overlaps the GPU), 0 on a CPU
    (its cores train)."""
    if requested is not None:
        return requested
    return min(8, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if device.type == "cuda" else 0


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches of `dataset`; shuffled, a last partial batch is dropped (not when drawn by a sampler). Under torchrun
    each process reads 1/N of the set (a DistributedSampler, or 1/N of the weighted draws, seeded per process by
    fit) in batches of batch_size / N: a step still sees batch_size samples (the whole step's, as in Table 1)."""
    drop_last = shuffle and len(dataset) > batch_size
    if world_size() > 1:
        if batch_size % world_size():
            raise UserError(f"--batch-size {batch_size}: not divisible by the {world_size()} processes")
        n = math.ceil(len(dataset) / world_size())
        sampler = torch.utils.data.DistributedSampler(dataset, world_size(), rank(), shuffle=shuffle) \
            if sampler is None else torch.utils.data.WeightedRandomSampler(sampler.weights, n, sampler.replacement)
        batch_size, shuffle, drop_last = batch_size // world_size(), False, drop_last and n > batch_size
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                                       persistent_workers=workers > 0)


def to_device(image, device):
    """A batch's images on the device in float32: loaders ship them as the cache stores them (float16 by default),
    and the upcast, exact, happens after the copy."""
    return image.to(device, non_blocking=True).float()


@torch.no_grad()
def recalibrate_batchnorm(model, loader, device, precision="fp32"):
    """"Precise BN": every BatchNorm's running statistics re-estimated over `loader` (the training set, in order) as a
    plain average with the current weights: with a high learning rate and small batches the moving averages lag
    the weights (brain age: validation MAE 20.2 with the epoch's statistics, 5.4 re-estimated, same weights)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for image, tabular, _ in loader:
        with autocast(device, precision):
            model(to_device(image, device), tabular.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        for t in (m.running_mean, m.running_var) if world_size() > 1 else ():
            dist.all_reduce(t)
            t.div_(world_size())
    model.train(was_training)


@torch.no_grad()
def predict(model, loader, device, transform=None, precision="fp32", on_batch=None, sides=False):
    """Every item of a loader through the model in eval mode -> (outputs (N, ...), targets (N,)) as numpy, every
    process's share gathered. `transform`: softmax (AD) or AgeTarget.decode (brain age). Both hippocampi, image
    (B, 2, 1, D, H, W): the two sides' outputs averaged (Sec. 4.3.6), or kept with `sides`. on_batch(n): progress."""
    model.eval()
    outputs, targets = [], []
    for image, tabular, target in loader:
        tabular = tabular.to(device, non_blocking=True)
        both = image.dim() == 6
        if both:
            B = image.shape[0]
            image, tabular = image.flatten(0, 1), tabular.repeat_interleave(2, 0)    # (2B, 1, D, H, W)
        with autocast(device, precision):
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
    """A model's outputs hold NaN or inf: diverged weights, or absurd inputs."""

    def __init__(self, detail):
        super().__init__(f"the model's outputs are {detail}")
        self.detail = detail


def check_finite_outputs(outputs):
    """outputs as they are, or NonFiniteOutputs saying for how many subjects they are NaN or inf (a metric of them
    would be a scikit-learn traceback, or a number that means nothing)."""
    bad = ~np.isfinite(outputs).reshape(len(outputs), -1).all(1)
    if bad.any():
        raise NonFiniteOutputs(f"{'nan' if np.isnan(outputs).any() else 'inf'} for {int(bad.sum())} of "
                               f"{len(bad)} subjects")
    return outputs


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(obj, path):
    """Atomic, serialised in memory first: a full disk is one error naming the folder and the bytes it needed."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(buf.getbuffer(), path)


def load_checkpoint(path, expected=None):
    """A checkpoint of ours; a corrupt file, or one whose identity differs from `expected` ({key: value} of run
    options and data facts), stops with a clear error."""
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

# Diverged though finite: an epoch's mean training loss over LOSS_BOUND times the untrained network's (its first
# batch). --lr 1e3 on the AD cohort gives 2e9 in the tabular MLP's first epoch (untrained: 1.3), and the epochs
# after it learn nothing; relative to the run's own start, so that it does not depend on the loss's units.
LOSS_BOUND = 1e6


def make_optimizer(model, lr, weight_decay, device):
    """Adam with weight decay on every trained parameter, internal and hypernetwork alike (Eq. 3: the generated
    weights are not parameters, so they are not decayed); fused into one kernel on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def fit(model, train_loader, loss_fn, validate, score_key, run, run_dir, inputs, state=None, resume=False,
        quiet=False, lower_is_better=False, sync_bn=False, before_validation=None, weight_decay=None):
    """The training loop of both tasks -> {"epoch", "score", "metrics"} of the best epoch by validate(model)[score_key].

    A step: forward and loss (Eq. 4 or 5) at the run's precision, backward, Adam with Eq. 3's decay (`weight_decay`,
    else run.weight_decay). Each epoch is seeded from (version, epoch): resumed from last.pt, a run ends exactly as an
    uninterrupted one on CPU. Every epoch writes last.pt (and best.pt when better: the run, `inputs`, its `state`)
    and log.csv. before_validation(model): brain age's precise BN. resume: continues last.pt (--epochs may grow);
    a finished run trained further loses its metrics first. Divergence stops the run (UserError) before its epoch
    is saved; a KeyboardInterrupt goes up with `progress`, what last.pt holds."""
    os.makedirs(run_dir, exist_ok=True)
    device = next(model.parameters()).device
    model, net = wrap(model, device, sync_bn)
    opt = make_optimizer(model, run.lr, run.weight_decay if weight_decay is None else weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")   # bfloat16 needs no loss scaling
    ctx = autocast(device, run.precision)
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
        gone = [f for f in FINISHED_FILES if os.path.isfile(os.path.join(run_dir, f))] if start < run.epochs else []
        if gone and is_main():
            for f in gone:
                os.remove(os.path.join(run_dir, f))
            log(f"{run_dir}: trains further: {' and '.join(gone)} of the finished run removed until it ends", quiet)
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
            net.train()
            losses, sizes = [], []
            for image, tabular, target in train_loader:
                image, tabular, target = (to_device(image, device), tabular.to(device, non_blocking=True),
                                          target.to(device, non_blocking=True))
                with ctx:
                    loss = loss_fn(net(image, tabular), target)                   # Eq. 4 or Eq. 5
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)                                                  # Adam with Eq. 3's decay
                scaler.update()
                losses.append(loss.detach())
                sizes.append(len(target))
            mean_loss, initial = check_losses(losses, sizes, epoch, initial, run_dir, saved)
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
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "best": best, "history": history, "initial_loss": initial, **header}
            if is_main():
                if improved:
                    save_checkpoint(ckpt, best_path)
                save_checkpoint(ckpt, last_path)
            saved = epoch                                         # what last.pt holds from now on
            if is_main():
                write_log(history, os.path.join(run_dir, "log.csv"))
            pace.advance()
            log(f"epoch {epoch + 1:3d}/{run.epochs} | train loss {mean_loss:.4f} | "
                f"val {score_key.replace('balanced_accuracy', 'BA')} {score:.3f}{' *' if improved else '  '} | "
                f"{seconds:.1f} s | {pace.left() / 60:.1f} min left", quiet)
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


def check_losses(losses, sizes, epoch, initial, run_dir, saved):
    """An epoch's step losses (read back once) -> (the mean over all processes, the untrained network's); diverged
    at the first non-finite one, naming its step, or at a mean over LOSS_BOUND times the untrained network's."""
    values = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    problem = f"the training loss is {float(values[bad[0]])} (step {bad[0] + 1} of {len(values)})" if bad else None
    mine = (float((values * torch.tensor(sizes, dtype=torch.float64)).sum()), sum(sizes),
            float(values[0]) if len(values) else 0.0)
    total, n, first = map(sum, zip(*everyone(mine)))
    if initial is None and epoch == 0:                    # the untrained network's loss (LOSS_BOUND)
        initial = first / world_size()
    mean = total / max(n, 1)
    if problem is None and initial is not None and initial > 0 and mean > LOSS_BOUND * initial:
        problem = f"the training loss {mean:.3g} is over {LOSS_BOUND:g} times the untrained network's ({initial:.3g})"
    check_divergence(problem, epoch, run_dir, saved)
    return mean, initial


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
    """A UserError naming the epoch and `problem` (what went non-finite) if any process reports one. Raised before
    the epoch is saved, so last.pt and best.pt keep the last good epoch."""
    problem = first_reported(problem)
    if problem is None:
        return
    kept = f"last.pt still holds epoch {saved + 1}, the last good one" if saved >= 0 else "nothing was saved"
    raise UserError(f"{run_dir}: training diverged in epoch {epoch + 1}: {problem}{' ' + when if when else ''}; "
                    f"{kept}. Lower --lr (or look for extreme values in the inputs) and train again"
                    + (" into another --out" if saved >= 0 else ""))


def write_log(history, path):
    write_csv(history, list(dict.fromkeys(k for row in history for k in row)), path)


# ----------------------------------------------------------------------------------------------
# A finished run read back, replayed with its own state: tabular preprocessing (Sec. 3.3), boxes, target, temperature

CALIBRATION_FILE = "calibration.json"   # an AD run's temperature and its validation calibration


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
    """A run folder, or a checkpoint file in one, -> FinishedRun (best.pt unless a file is named). `expected`
    ({key: value}, see identity) refuses a run that is not the one asked for."""
    path = os.fspath(path)
    checkpoint_path = path if os.path.isfile(path) else os.path.join(path, "best.pt")
    ckpt = load_checkpoint(checkpoint_path, expected)
    try:
        run = RunConfig(**ckpt["run"])
    except TypeError as exc:
        raise UserError(f"{checkpoint_path}: not a run description this code knows ({exc})") from None
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    return FinishedRun(folder, checkpoint_path, ckpt, run, dict(ckpt["inputs"]))


# ----------------------------------------------------------------------------------------------
# Temperature scaling of an AD run's logits (calibration.json)

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
