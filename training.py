"""What both trainers share: the run's options and folder, the device, many processes, the loop `fit`, checkpoints.
A run is its RunConfig, stored in every checkpoint with its data facts (`inputs`) so that a run is replayed exactly."""
import atexit
import contextlib
import dataclasses
import fcntl
import datetime
import io
import json
import math
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import minimize_scalar
from torch.nn.parallel import DistributedDataParallel

from data import (HippocampusCrops, Progress, TabularPreprocessor, UserError, atomic_path, check_folder, check_number,
                  warn, write_bytes, write_csv, write_json)
from metrics import calibration_metrics
from models import AgeTarget, build_model, class_probabilities
from synthetic import builtin_cohort


# A collective's timeout: the other ranks wait while rank 0 decodes the image cache (26,691 brain-age scans: 24 min)
WAIT_HOURS = 2
_state = {"alone": False}  # True while rank 0 works by itself (see `alone`)


# ---- Many processes (torchrun, DDP) ----

def world_size():
    return 1 if _state["alone"] or not dist.is_initialized() else dist.get_world_size()


def rank():
    return 0 if _state["alone"] or not dist.is_initialized() else dist.get_rank()


def is_main():
    return rank() == 0  # the one process that prints and writes files


def log(message, quiet=False):
    if not quiet and is_main():
        print(message, flush=True)


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. decodes the cache), the others once rank 0 is done."""
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


def everyone(value):
    """Every process's `value` in rank order (as objects: NCCL needs no CUDA tensor here)."""
    if world_size() == 1:
        return [value]
    parts = [None] * world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather(rows, n):
    """Each process's rows of its DistributedSampler share (rank r: items r, r + N, ...) -> all n in their order."""
    return rows if world_size() == 1 else np.stack(everyone(rows), 1).reshape(-1, *rows.shape[1:])[:n]   # padded


def wrap(model, device, sync_bn=False):
    """-> (model, net): `net` trains (DDP averages the gradients), `model` is saved and evaluated."""
    if world_size() == 1:
        return model, model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def first_reported(value):
    """The first process's value that is not None, on every process: one verdict, so that none stops alone."""
    return next((p for p in everyone(value) if p is not None), None)


# ---- Precision: float32, or one autocast context around the forward pass and the loss ----

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported(precision, device):
    """Why `device` does not train in `precision`, or None."""
    if precision == "fp16" and device.type != "cuda":
        return "float16 with loss scaling is for CUDA; use fp32"
    if precision == "bf16" and device.type != "cuda":  # 0.93x float32's speed here; oneDNN's conv gradient is wrong
        return "bfloat16 on a CPU is slower than float32 here and its convolution gradients are not exact; use fp32"
    if precision == "bf16" and torch.cuda.get_device_capability(device) < (8, 0):
        return f"{torch.cuda.get_device_name(device)} only emulates bfloat16 (compute capability < 8.0); use fp16"


def resolve_precision(name, device, quiet=False):
    """--precision -> the run's precision: auto is fp32 (no faster precision has been shown as accurate)."""
    precision = "fp32" if name == "auto" else name
    if unsupported(precision, device):
        raise UserError(f"--precision {name}: {unsupported(precision, device)}")
    log(f"device {device}, precision {precision}" + (" (--precision auto)" if name == "auto" else ""), quiet)
    return precision


def replay_precision(trained, device):
    """A finished run's precision where `device` can do it; else (or from before precision was stored) fp32."""
    return trained if trained in PRECISIONS and not unsupported(trained, device) else "fp32"


def autocast(device, precision):
    dtype = PRECISIONS[precision or "fp32"]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---- What defines a run: its options (RunConfig), where it lives, its schedule ----

SCHEDULE = {"epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "lr_schedule": str}
LR_SCHEDULES = ("constant", "cosine")   # constant: Table 1's; cosine: the brain-age demo's (fit)
# a checkpoint belongs to a run when these match (epochs may grow on --resume; data is compared by content)
DATA_KEYS = ("task", "model", "split_seed", "fold", "version", "classes", "group_map", "n_tabular",
             "tabular_columns", "embedding_dim", "train_sex", "split", "table_sha256")
IDENTITY_KEYS = DATA_KEYS + ("loss", "batch_size", "lr", "weight_decay", "lr_schedule", "images_sha256", "image_shape",
                             "crops", "target_scale", "precision")


@dataclasses.dataclass(frozen=True)
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
    fold: int = None                 # AD: the validation subset, 0..3
    classes: int = None              # AD: 3, or 2 for CN vs AD (App. B)
    loss: str = None                 # AD: "wce" (Eq. 5), "ce" or "ce-oversample" (App. C.4)
    crops: str = None                # AD: crops.json (None: next to the CSV, else the MNI152 boxes)
    group_map: dict = None           # AD: extra Group values read as a diagnosis, {"SMC": "CN"}
    embedding_dim: int = None        # brain age: the sex embedding 2->1 or 2->2
    train_sex: str = None            # brain age: "all", or Fig. 4A's "M", "F", "mixed"
    split: tuple = None              # brain age: train/val/test fractions (None: Sec. 4.2.3's 80/10/10)
    precision: str = None            # "fp32", "bf16" or "fp16" (resolve_precision); None: a run from before
    lr_schedule: str = None          # "constant" or "cosine" (fit); None: constant, a run from before

    def run_dir(self, out):
        if self.task == "ad":
            return ad_run_dir(out, self.model, self.split_seed, self.version, self.fold, self.classes == 2, self.loss)
        return brain_age_run_dir(out, self.model, self.version, self.embedding_dim, self.train_sex)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def build_model(self, inputs):
        return build_model(self.task, self.model, image_shape=inputs.get("image_shape"), n_tabular=inputs["n_tabular"],
                           n_classes=self.classes or 3, embedding_dim=self.embedding_dim)


def ad_run_dir(out, model, split_seed, version, fold, binary=False, loss="wce"):
    """<out>/ad[-binary]/<model>[-<loss>]/seed<S>/v<V>/fold<F>: App. C.4's losses apart from Eq. 5's (Table 3's)"""
    return os.path.join(out, "ad-binary" if binary else "ad", model + (f"-{loss}" if loss not in (None, "wce") else ""),
                        f"seed{split_seed}", f"v{version}", f"fold{fold}")


def brain_age_run_dir(out, model, version, embedding_dim=1, train_sex="all"):
    """<out>/brain-age/<model>[-emb2][-train<M|F|mixed>]/v<V>"""
    folder = model + (f"-emb{embedding_dim}" if embedding_dim not in (None, 1) else "") + \
        (f"-train{train_sex}" if train_sex not in (None, "all") else "")
    return os.path.join(out, "brain-age", folder, f"v{version}")


def identity(run, inputs, keys=IDENTITY_KEYS):
    """The values of `keys` that a checkpoint of this run must hold (run options and data facts)."""
    flat = {**dataclasses.asdict(run), **inputs}
    return {k: flat.get(k) for k in keys}


def cores():
    """The cores this process may run on: its affinity (a container's or a scheduler's share), on macOS all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_common_arguments(p):
    p.add_argument("--version", type=int, default=0, help="initialisation seed (Sec. 4.3.6 'versions')")
    p.add_argument("--data-csv", help="the table; default: the built-in synthetic cohort")
    p.add_argument("--image-dir", help="folder of <Subject>.nii.gz (default: <csv folder>/images)")
    p.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    p.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache)")
    for k, kind in SCHEDULE.items():
        p.add_argument("--" + k.replace("_", "-"), type=kind, help="default: Table 1, or the demo",
                       **({"choices": LR_SCHEDULES} if k == "lr_schedule" else {}))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help="auto: fp32; bf16, fp16: CUDA")
    p.add_argument("--workers", type=int,
                   help="loader workers, at most 4 a core (default: CUDA min(8, cores / processes), CPU 0)")
    p.add_argument("--sync-bn", action="store_true", help="torchrun on CUDA: batch norms over the whole batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step: the same arithmetic, "
                   "a step 1.13-1.30x faster on a CPU after 10-30 s of compiling: for long runs (RESULTS.md)")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def common_run_fields(args, device, task, demo, real):
    """The RunConfig fields both trainers resolve alike: the table (the built-in synthetic cohort without
    --data-csv), the schedule (numbers checked; unset ones the demo's or Table 1's), the images, the precision."""
    synthetic, quiet = args["data_csv"] is None, args["quiet"]
    most = dict(version=2 ** 31 - 1, split_seed=2 ** 31 - 1,   # a seed torch takes
                workers=4 * cores())                           # loader processes: a typo would spawn thousands
    for k, least in dict(epochs=1, batch_size=1, weight_decay=0, workers=0, version=0, split_seed=0).items():
        check_number("--" + k.replace("_", "-"), args.get(k), least=least, most=most.get(k))
    check_number("--lr", args.get("lr"), above=0)
    check_folder("--out", args["out"], "the runs")                      # before the cohort is generated
    precision = resolve_precision(args["precision"], device, quiet)     # refused before the cohort is generated
    schedule = {k: args[k] if args[k] is not None else (demo if synthetic else real)[k] for k in SCHEDULE}
    b, n = schedule["batch_size"], world_size()    # torchrun: each process takes b / n of every step's batch
    if b % n or task == "ad" and b < 2 * n:       # AD: one sample a process stops the tabular BatchNorm1d
        raise UserError(f"--batch-size {b}: each of the {n} processes takes --batch-size / {n} of a step's batch; "
                        f"give a multiple of {n}" + (f", at least {2 * n}" if task == "ad" else ""))
    with main_first():  # torchrun: rank 0 generates the synthetic cohort, the others wait for it
        data_csv = builtin_cohort(task, args["data_dir"], quiet) if synthetic else args["data_csv"]
    log(f"schedule ({'demo (synthetic cohort)' if synthetic else 'Table 1'}): "
        + ", ".join(f"{k} {v}" for k, v in schedule.items()), quiet)
    return dict(task=task, model=args["model"], version=args["version"], split_seed=args["split_seed"], **schedule,
                data_csv=data_csv, image_dir=args["image_dir"], cache_dir=args["cache_dir"], precision=precision)


# ---- A run folder holds one run: claimed by one live process at a time, refused to a new run while it holds one ----

FINISHED_FILES = ("metrics.json", "predictions.npz", "logits.npz", "calibration.json")  # its final best.pt's
RUN_FILES = ("best.pt", "last.pt", "log.csv") + FINISHED_FILES                          # what a run writes
LOCK_NAME = ".lock"


@contextlib.contextmanager
def claim_run_folder(run_dir, resume):
    """run_dir for this run alone (an flock, dropped however the process ends), refused before any work when
    locked or occupied; on release the lock file goes, and the folders made here if still empty."""
    fd, made, refusal, path = None, [], None, os.path.join(run_dir, LOCK_NAME)
    try:
        if is_main():
            d = os.path.abspath(run_dir)
            while not os.path.isdir(d) and os.path.dirname(d) != d:
                made, d = made + [d], os.path.dirname(d)                  # deepest first
            os.makedirs(run_dir, exist_ok=True)
            while True:                                   # until the file locked is the one `path` names
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that has just started"
                    os.close(fd)
                    fd, refusal = None, f"{run_dir}: in use by another training process ({holder}); wait for it " \
                                        f"to end, or use another --out"
                    break
                if same_file(path, fd):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                    break
                os.close(fd)
            for f in os.listdir(run_dir) if refusal is None else ():    # a killed writer's partial file (kill -9)
                if f.startswith(".tmp-") and f.split("-", 2)[-1] in RUN_FILES:
                    os.remove(os.path.join(run_dir, f))
            refusal = refusal or occupied(run_dir, resume)
        refusal = first_reported(refusal)      # torchrun: rank 0's verdict is every process's
        if refusal:
            raise UserError(refusal)
        yield
    finally:
        if fd is not None:
            if same_file(path, fd):
                os.remove(path)                      # still locked: no one else can have taken it
            os.close(fd)
        with contextlib.suppress(OSError):           # up to the first one not empty (the run wrote in it), or gone
            for d in made:
                os.rmdir(d)


def same_file(path, fd):
    with contextlib.suppress(OSError):
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    return False


def occupied(run_dir, resume):
    """Why run_dir cannot take a new run (without --resume) or be resumed (with it), in words; None if it can."""
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(run_dir, f))]
    if not held or resume and "last.pt" in held:
        return None
    if resume:
        return f"{run_dir}: --resume: no last.pt to continue from, and the folder holds another run's " \
               f"{', '.join(held)}; use another --out, or delete them"
    what, hint = f"another run's {', '.join(held)}", "delete them"
    if "metrics.json" in held:
        what, hint = f"a finished run ({', '.join(held)})", "use --resume to train it further (a larger --epochs)"
    elif "last.pt" in held:
        what, hint = "an unfinished run (last.pt)", "use --resume to continue it"
        with contextlib.suppress(Exception):          # unreadable: named alone
            epoch = torch.load(os.path.join(run_dir, "last.pt"), "cpu", weights_only=True)["epoch"] + 1
            what = f"an unfinished run (last.pt after epoch {epoch})"
    return f"{run_dir}: holds {what}, and a new run would mix with it; {hint}, or use another --out for the new run"


def train_run(args, task, demo, real, body, **fields):
    """One run of `task` from its parsed options: the device, the RunConfig (common_run_fields and the task's
    `fields`), then body(args, device, run) -> its metrics, in the run's folder claimed before any work."""
    device = setup_device(args["device"], args["sync_bn"])
    run = RunConfig(**common_run_fields(args, device, task, demo, real), **fields)
    with claim_run_folder(run.run_dir(args["out"]), args["resume"]):
        metrics = body(args, device, run)
    leave()
    return metrics


# ---- Device, randomness, loaders, evaluation passes ----

def setup_device(name, sync_bn=False):
    """The device, TF32 off (float32 means float32); under torchrun the process group and the local rank's GPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",   # device_id: NCCL's barrier on its
                                timeout=datetime.timedelta(hours=WAIT_HOURS),   # GPU, no guess (nor context on GPU 0)
                                device_id=device if device.type == "cuda" else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())   # a failed run's exit
    return device


def leave():
    """A successful run's end: all processes meet before the group is torn down (gloo aborted early leavers)."""
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def loader_workers(requested, device):
    """--workers, else on CUDA min(8, cores / processes on this machine), 0 on a CPU (its cores train)."""
    if requested is not None:
        return requested
    return min(8, cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if device.type == "cuda" else 0


def make_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches of `dataset` (torchrun: 1/N of it in batches of batch_size / N); for training (shuffle or sampler)
    drawn anew each epoch."""
    train, n = shuffle or sampler is not None, len(dataset)
    if world_size() > 1:                                       # batch_size: a multiple (common_run_fields)
        n = math.ceil(len(dataset) / world_size())
        sampler = torch.utils.data.DistributedSampler(dataset, world_size(), rank(), shuffle=shuffle) \
            if sampler is None else torch.utils.data.WeightedRandomSampler(sampler.weights, n, sampler.replacement)
        batch_size, shuffle = batch_size // world_size(), False
    # training: no last partial batch (one sample would stop a BatchNorm), workers started each epoch (seeded by
    # fit's (version, epoch) seed, so the sides drawn, Sec. 4.3.6, are a resumed run's too)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       drop_last=train and n > batch_size, persistent_workers=workers > 0 and not train)


@torch.no_grad()
def recalibrate_batchnorm(model, loader, device, precision="fp32"):
    """"Precise BN": running statistics re-averaged over `loader` (brain age: val MAE 20.2 with moving ones, 5.4)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [m.momentum for m in norms], model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for image, tabular, _ in loader if norms else ():
        with autocast(device, precision):
            model(image.to(device, non_blocking=True), tabular.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        for t in (m.running_mean, m.running_var) if world_size() > 1 else ():
            dist.all_reduce(t)
            t.div_(world_size())
    model.train(was_training)


@torch.no_grad()
def predict(model, loader, device, transform=None, precision="fp32", on_batch=None, sides=False):
    """-> (outputs (N, ...), targets (N,)) of all processes; both hippocampi averaged (Sec. 4.3.6) unless `sides`."""
    model.eval()
    outputs, targets = [], []
    for image, tabular, target in loader:
        tabular, both = tabular.to(device, non_blocking=True), image.dim() == 6       # (B, 2, 1, D, H, W): both
        if both:
            image, tabular = image.flatten(0, 1), tabular.repeat_interleave(2, 0)    # (2B, 1, D, H, W)
        with autocast(device, precision):
            out = model(image.to(device, non_blocking=True), tabular).float()
        out = transform(out) if transform is not None else out
        if both:
            out = out.unflatten(0, (-1, 2))                                          # (B, 2, ...)
            out = out if sides else out.mean(1)                                      # (B, ...)
        outputs.append(out.cpu())
        targets.append(target.cpu())
        if on_batch is not None:
            on_batch(len(target))
    n = len(loader.dataset)
    return gather(torch.cat(outputs).numpy(), n), gather(torch.cat(targets).numpy(), n)


class NonFiniteOutputs(UserError):
    def __init__(self, detail):
        super().__init__(f"the model's outputs are {detail}")
        self.detail = detail


def check_finite_outputs(outputs):
    """NonFiniteOutputs naming for how many subjects the outputs are NaN or inf (no metric means anything)."""
    bad = ~np.isfinite(outputs).reshape(len(outputs), -1).all(1)
    if bad.any():
        raise NonFiniteOutputs(f"{'nan' if np.isnan(outputs).any() else 'inf'} for {int(bad.sum())} of "
                               f"{len(bad)} subjects")


# ---- Checkpoints ----

def save_checkpoint(obj, path):
    """Atomic, serialised in memory first: a full disk is one error naming the folder and the bytes it needed."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(buf.getbuffer(), path)


def load_checkpoint(path, expected=None):
    """A checkpoint of ours; a corrupt one, or one whose identity differs from `expected` (see identity), refused."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise UserError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}); "
                        f"delete it to start the run afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "run", "inputs", "epoch"} <= set(ckpt):
        raise UserError(f"{path}: not a checkpoint written by this version of the code")
    held = {**ckpt["run"], **ckpt["inputs"]} if expected else {}
    diff = [f"{k}: checkpoint {held.get(k)!r}, now {v!r}" for k, v in (expected or {}).items() if held.get(k) != v]
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
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
        raise UserError(f"{path}: the saved {what} does not fit this run's ({lines[min(1, len(lines) - 1)]})") from None


def resumable(run_dir, resume):
    return resume and os.path.isfile(os.path.join(run_dir, "last.pt"))


# ---- The loop ----

# Diverged though finite: a mean training loss over LOSS_BOUND times the untrained network's (its first batch);
# --lr 1e3 on the AD cohort gives 2e9 in the tabular MLP's first epoch (untrained: 1.3), and nothing learnt after.
LOSS_BOUND = 1e6


def make_optimizer(model, lr, weight_decay, device):
    """Adam with Eq. 3's decay on every trained parameter (generated weights are none); fused on CUDA."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def compiled(net):
    """--compile: `net` through torch.compile for training, as exact as eager float32: dropout draws eager's masks
    (fallback_random), one graph per input shape (dynamic=False; inductor's dynamic shapes failed on a new shape)."""
    import torch._inductor.config as inductor   # here: 1.5 s of start-up that only --compile needs
    inductor.fallback_random = True
    return torch.compile(net, dynamic=False)


def fit(model, train_loader, loss_fn, validate, score_key, run, run_dir, inputs, state=None, resume=False,
        quiet=False, lower_is_better=False, sync_bn=False, before_validation=None, weight_decay=None, compile=False):
    """The loop of both tasks -> the best epoch's {"epoch", "score", "metrics"}. Epochs are seeded from (version,
    epoch): resumed from last.pt, a run ends as an uninterrupted one. Divergence stops it before the epoch is saved."""
    os.makedirs(run_dir, exist_ok=True)
    device = next(model.parameters()).device
    model, net = wrap(model, device, sync_bn)
    net = compiled(net) if compile else net                    # trains; `model` is saved, validated, re-estimated
    opt = make_optimizer(model, run.lr, run.weight_decay if weight_decay is None else weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")   # bfloat16 needs no loss scaling
    start, best, history, initial = 0, None, [], None
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if resumable(run_dir, resume):
        ckpt = load_checkpoint(last_path, identity(run, inputs))
        load_weights(model, ckpt["model"], last_path)
        load_weights(opt, ckpt["optimizer"], last_path, "optimiser state")
        load_weights(scaler, ckpt.get("scaler") or scaler.state_dict(), last_path, "loss scale")
        start, best, history, initial = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"], ckpt.get("initial_loss")
        if start > run.epochs:
            raise UserError(f"--epochs {run.epochs}: {last_path} has trained {start} epochs already; --resume "
                            f"continues that run, so --epochs may grow but not shrink")
        log(f"resuming {last_path} after epoch {start}", quiet)
        gone = [f for f in FINISHED_FILES if os.path.isfile(os.path.join(run_dir, f))] if start < run.epochs else []
        for f in gone if is_main() else ():
            os.remove(os.path.join(run_dir, f))
        log(f"{run_dir}: trains further: {' and '.join(gone)} of the finished run removed until it ends",
            quiet or not gone)
    elif resume:
        log(f"--resume: no {last_path} yet, starting afresh", quiet)
    header = {"run": dataclasses.asdict(run), "inputs": inputs, **(state or {})}
    pace, saved = Progress("epochs", run.epochs - start, quiet=True), start - 1  # saved: the epoch last.pt holds
    try:
        for epoch in range(start, run.epochs):
            t0 = time.time()
            torch.manual_seed(run.version * 1_000_003 + epoch + 7_919 * rank())
            cosine = run.lr_schedule == "cosine"                  # the brain-age demo's, so that its end settles
            for group in opt.param_groups:
                group["lr"] = run.lr * (0.5 * (1 + math.cos(math.pi * epoch / run.epochs)) if cosine else 1)
            if hasattr(train_loader.sampler, "set_epoch"):        # torchrun: a new shuffle, the same on all ranks
                train_loader.sampler.set_epoch(run.version * 1_000_003 + epoch)
            net.train()
            losses, sizes = [], []
            for image, tabular, target in train_loader:
                image, tabular, target = (t.to(device, non_blocking=True) for t in (image, tabular, target))
                with autocast(device, run.precision):
                    loss = loss_fn(net(image, tabular), target)                   # Eq. 4 or Eq. 5
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)                                                  # Adam with Eq. 3's decay
                scaler.update()
                losses.append(loss.detach())
                sizes.append(len(target))
            mean_loss, initial = check_losses(losses, sizes, epoch, initial, run_dir, saved)
            for b in model.buffers() if world_size() > 1 else ():   # DDP syncs them at a forward's start only: each
                dist.broadcast(b, 0)                              # process validates the model rank 0 saves
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
            try:
                for path in ((best_path, last_path) if improved else (last_path,)) if is_main() else ():
                    save_checkpoint(ckpt, path)
            except UserError:          # a full disk: a best.pt without last.pt would block the folder's rerun
                if saved < 0:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(best_path)
                raise
            saved = epoch                                         # what last.pt holds from now on
            if is_main():
                write_log(history, os.path.join(run_dir, "log.csv"))
            pace.advance()
            log(f"epoch {epoch + 1:3d}/{run.epochs} | train loss {mean_loss:.4f} | "
                f"val {score_key.replace('balanced_accuracy', 'BA')} {score:.3f}{' *' if improved else '  '} | "
                f"{seconds:.1f} s | {pace.left() / 60:.1f} min left", quiet)
            if compile and epoch == start:                        # it compiled the step: the time left is the pace
                pace.rebase()                                     # of the epochs after it
    except (KeyboardInterrupt, RuntimeError) as exc:  # Ctrl-C, SIGTERM, a torchrun peer lost: run_cli says what is kept
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
    """-> (the epoch's mean loss over all processes, the untrained network's); diverged if non-finite or too high."""
    values = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)  # one read-back
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
    tensors += [(f"BatchNorm running statistic {k}", b) for k, b in model.named_buffers()   # None ones are not listed
                if k.endswith(("running_mean", "running_var"))]
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors]).cpu() if tensors else None
    if finite is None or bool(finite.all()):                                              # one device sync
        return None
    name, t = tensors[int((~finite).nonzero()[0])]
    return f"the {name} is {'nan' if torch.isnan(t).any() else 'inf'}"


def check_divergence(problem, epoch, run_dir, saved, when=""):
    """A UserError naming the epoch and `problem` if any process reports one, raised before the epoch is saved."""
    if (problem := first_reported(problem)) is None:
        return
    kept = f"last.pt still holds epoch {saved + 1}, the last good one" if saved >= 0 else "nothing was saved"
    raise UserError(f"{run_dir}: training diverged in epoch {epoch + 1}: {problem}{' ' + when if when else ''}; "
                    f"{kept}. Lower --lr (or look for extreme values in the inputs) and train again"
                    + (" into another --out" if saved >= 0 else ""))


def write_log(history, path):
    write_csv(history, list(dict.fromkeys(k for row in history for k in row)), path)


# ---- A finished run read back with its own state: tabular preprocessing (Sec. 3.3), boxes, target, temperature ----

CALIBRATION_FILE = "calibration.json"   # an AD run's temperature and its validation calibration


def finished(run_dir):
    return os.path.isfile(os.path.join(run_dir, "metrics.json"))   # written last, atomically, by the trainers


class FinishedRun:
    """One trained run read back from its folder (its best.pt) or a checkpoint: the RunConfig, the data facts
    (`inputs`) and the state stored with them; `expected` (see identity) refuses another run."""

    def __init__(self, path, expected=None):
        path = os.fspath(path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "best.pt")):
            raise UserError(f"{path}: not a run folder (no best.pt in it); give the folder of one finished run")
        if os.path.isfile(path) and not path.endswith(".pt"):          # metrics.json: not a 'corrupt checkpoint'
            raise UserError(f"{path}: a file of the run in {os.path.dirname(os.path.abspath(path))}, not its "
                            f"checkpoint; give that run folder (or its best.pt)")
        self.checkpoint_path = path = path if os.path.isfile(path) else os.path.join(path, "best.pt")
        self.dir, self.checkpoint = os.path.dirname(path), load_checkpoint(path, expected)
        try:
            self.run = RunConfig(**self.checkpoint["run"])
        except TypeError as exc:
            raise UserError(f"{path}: not a run description this code knows ({exc})") from None
        ckpt, self.inputs = self.checkpoint, dict(self.checkpoint["inputs"])
        self.class_names = list(self.inputs.get("class_names", ()))         # AD: the classes of its outputs, in order
        self.tabular = TabularPreprocessor(state=ckpt["tabular"]) if ckpt.get("tabular") is not None else None  # AD
        self.crops = HippocampusCrops(**self.inputs["crops"]) if self.inputs.get("crops") else None  # AD image models
        self.target = AgeTarget(**ckpt["target"]) if ckpt.get("target") is not None else None  # brain age: -> years

    @property
    def config(self):  # run options and data facts in one flat dict, compared before runs are ensembled
        return {**dataclasses.asdict(self.run), **self.inputs}

    def model(self, device="cpu"):
        model = self.run.build_model(self.inputs)
        load_weights(model, self.checkpoint["model"], self.checkpoint_path, f"{self.run.model} model")
        return model.to(device).eval()

    def read_metrics(self):
        metrics, need = self.read_json("metrics.json"), ("mae",) * (self.run.task == "brain-age")   # evaluate ranks
        if not all(isinstance(metrics.get(part), dict) and all(type(metrics[part].get(k)) in (int, float) for k in need)
                   for part in ("val", "test")):                                       # what the trainers write
            raise UserError(f"{os.path.join(self.dir, 'metrics.json')}: not the metrics.json a training run writes")
        return metrics

    def read_json(self, name):
        path = os.path.join(self.dir, name)
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}: not the {name} a training run writes")
        return obj

    @property
    def temperature(self):
        """AD: the temperature fitted on the run's validation set (calibration.json); None before calibration."""
        path = os.path.join(self.dir, CALIBRATION_FILE)
        t = self.read_json(CALIBRATION_FILE).get("temperature") if os.path.isfile(path) else None
        if t is not None and not (type(t) in (int, float) and math.isfinite(t) and t > 0):   # bool is no number
            raise UserError(f"{path}: temperature {t!r} is not a positive number")
        return None if t is None else float(t)

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
        n, c = len(pred["subjects"]), len(self.class_names)              # AD: (n, c) finite probabilities
        if pred.get("probs", np.zeros((n, c))).shape != (n, c) or not np.isfinite(pred.get("probs", 0)).all() \
                or any(len(pred[k]) != n for k in ("labels", "pred", "age", "sex") if k in pred):
            raise UserError(f"{path}: its arrays ({', '.join(f'{k} {v.shape}' for k, v in pred.items())}) do not fit "
                            f"one another{f' and the {c} classes of the run' if c else ''}, or hold NaN: edited? train "
                            f"the run again")
        return pred


load_run = FinishedRun   # a run folder or checkpoint -> its FinishedRun


# ---- Temperature scaling of an AD run's logits (calibration.json) ----

LOGITS_FILE = "logits.npz"      # a run's validation and test logits, (N, C) or (N, 2, C) with both hippocampi
T_BOUNDS = (0.01, 100.0)        # the temperatures searched; a fit at a bound says the run is degenerate


def probabilities(logits, temperature=1.0):
    """Logits (N, C), or (N, 2, C) -> (N, C) float64 softmax(z / T), both hippocampi averaged (Sec. 4.3.6)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    p = class_probabilities(z.reshape(-1, z.shape[-1]), temperature).reshape(z.shape).numpy()
    return p.mean(1) if p.ndim == 3 else p


def fit_temperature(logits, labels):
    """The T that minimises the validation NLL of softmax(logits / T), searched over log T within T_BOUNDS."""
    labels = np.asarray(labels)
    nll = lambda log_t: -np.log(np.clip(probabilities(logits, math.exp(log_t))[np.arange(len(labels)), labels],
                                        1e-300, None)).mean()
    found = minimize_scalar(nll, method="bounded", bounds=tuple(map(math.log, T_BOUNDS)), options={"xatol": 1e-7})
    low = math.log(T_BOUNDS[0])   # a perfectly separated set: the NLL falls to 0 as T -> 0, flat once it underflows
    return T_BOUNDS[0] if nll(low) <= found.fun else float(math.exp(found.x))


def save_logits(run_dir, val, test):
    """logits.npz of a run: val and test as (logits, labels)."""
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
    """The temperature fitted on read_logits' "val" -> calibration.json's record (it, calibration before/after).
    A fit at the lower bound (a perfectly separated validation set drives T to 0: every probability to 0 or 1) is
    not used: T = 1, with a warning; at the upper bound the probabilities only flatten (a run that learnt little)."""
    T = fit_temperature(*outputs["val"])
    low = abs(math.log(T / T_BOUNDS[0])) < 1e-3
    record = {"temperature": 1.0 if low else T, "fitted": T, "fitted_on": "validation", "n_val": len(outputs["val"][1]),
              "at_bound": bool(min(abs(math.log(T / b)) for b in T_BOUNDS) < 1e-3)}
    if low:
        record["warning"] = (f"{run_dir}: the temperature's fit ended at the search's lower bound ({T:.3g}; a "
                             f"perfectly separated validation set): not used, T = 1 (no scaling)")
        warn(record["warning"])
    record.update(calibration_change(outputs, record["temperature"]))
    write_json(record, os.path.join(run_dir, CALIBRATION_FILE))
    return record


def calibration_change(outputs, temperature):
    """{part: {"before": its calibration metrics at T = 1, "after": at `temperature`}} of read_logits' outputs."""
    return {part: {"before": calibration_metrics(labels, probabilities(logits)),
                   "after": calibration_metrics(labels, probabilities(logits, temperature))}
            for part, (logits, labels) in outputs.items()}
