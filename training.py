"""The training machinery both tasks share: device, loaders, the loop, checkpoints.

train_ad.py and train_brain_age.py each describe one run of their task (data, model, loss, metric)
and hand it to `fit`, the hand-written loop of both (Adam with weight decay, Eq. 3). What defines the run
is its RunConfig (runconfig.py), written into every checkpoint with the facts it learned from its data
(`inputs`: tabular columns, classes, crops, image shape), so that a checkpoint of another run is refused and
a finished run can be replayed exactly (runs.py). A run that diverges stops in one line with its last good
checkpoint kept (fit); its folder holds that one run alone (runfolder.py).
"""
import copy
import dataclasses
import io
import math
import os
import random
import time

import numpy as np
import torch

import distributed
from distributed import log
from precision import autocast, base, keeps
from runconfig import identity, learning_rate
from runfolder import discard_finished_outputs
from safeio import Progress, UserError, write_bytes, write_csv

# ----------------------------------------------------------------------------------------------
# Device, randomness, loaders

def setup_device(name):
    """auto: CUDA when present. On CUDA, cudnn.benchmark (fixed input shapes). Under torchrun, joins the
    process group (distributed.init) and, on CUDA, takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if distributed.launched():
            if distributed.local_rank() >= torch.cuda.device_count():
                raise UserError(f"--nproc_per_node: process {distributed.local_rank()} has no GPU of its own "
                                f"({torch.cuda.device_count()} visible)")
            device = torch.device("cuda", distributed.local_rank())
            torch.cuda.set_device(device)
    distributed.init(device.type)
    return device


def loader_workers(requested, device):
    """--workers, else on CUDA min(8, cores / processes on this machine) (decoding overlaps the GPU) and 0 on
    CPU (the cores train)."""
    if requested is not None:
        return requested
    return min(8, (os.cpu_count() or 1) // distributed.local_world_size()) if device.type == "cuda" else 0


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_loader(dataset, batch_size, workers, device, shuffle=False, sampler=None):
    """Batches of `dataset`; a shuffled training loader drops a last partial batch (one drawn by a sampler,
    --loss ce-oversample, keeps it, as DeviceBatches does).

    Under torchrun each process reads its share (distributed.shard, re-shuffled by fit every epoch) in
    batches of batch_size / N, so a step still sees batch_size samples."""
    drop_last = shuffle and len(dataset) > batch_size
    if distributed.world_size() > 1:
        sampler, batch_size = distributed.shard(dataset, shuffle, sampler), distributed.local_batch(batch_size)
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
        self.held = list(distributed.shard(dataset, shuffle=False)) if distributed.world_size() > 1 \
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
        if distributed.world_size() > 1:
            batch_size = distributed.local_batch(batch_size)
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
    distributed.average([b for m in norms for b in (m.running_mean, m.running_var)])
    model.train(was_training)


@torch.no_grad()
def predict(model, loader, device, transform=None, precision="fp32", on_batch=None, sides=False):
    """Every item of a loader through the model in eval mode -> (outputs (N, ...), targets (N,)) as numpy.
    on_batch(n), if given, is told each batch's n items once they are through (predict.py's progress).

    `transform` maps the network's output (softmax for AD, AgeTarget.decode for brain age). An item
    that holds both hippocampi, image (B, 2, 1, D, H, W), is read as 2B images and the transformed
    outputs of its two sides are averaged (Sec. 4.3.6), or with `sides` kept: (N, 2, ...) (what temperature
    scaling fits its logits on, calibration.py). Under torchrun every process predicts its share
    and gets everyone's back, in dataset order (distributed.gather)."""
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
    return distributed.gather(torch.cat(outputs).numpy(), n), distributed.gather(torch.cat(targets).numpy(), n)


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
    half-trained best.pt is never taken for a finished run's (runs.finished). Divergence stops the run with a
    UserError naming the epoch and what went non-finite (check_divergence), before that epoch is saved: last.pt
    and best.pt keep the last good epoch. A KeyboardInterrupt (Ctrl-C, or SIGTERM as safeio.Terminated)
    goes on up with `progress`, what last.pt holds, for safeio.run_cli's one line.

    Under torchrun (distributed.py) the model trains inside DDP (SyncBatchNorm with sync_bn), each
    process on its share of the batch and with its own dropout draws; rank 0 alone writes. The
    speed options: channels_last (channels_last_3d memory format) and compile (torch.compile).
    """
    os.makedirs(run_dir, exist_ok=True)
    device = next(model.parameters()).device
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    model, net = distributed.wrap(model, device, sync_bn)   # net trains; model is saved and validated
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
            torch.manual_seed(run.version * 1_000_003 + epoch + 7_919 * distributed.rank())
            for group in opt.param_groups:
                group["lr"] = learning_rate(run, epoch)
            if hasattr(train_loader.sampler, "set_epoch"):        # torchrun: a new shuffle, the same on all ranks
                train_loader.sampler.set_epoch(run.version * 1_000_003 + epoch)
            total, n, first, problem = train_epoch(net, opt, scaler, train_loader, loss_fn, device, channels_last,
                                                   run.precision or "fp32")
            total, n, first = distributed.sum_all(total, n, first)
            if initial is None and epoch == 0:                    # the untrained network's loss (LOSS_BOUND)
                initial = first / distributed.world_size()
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
            if distributed.is_main():
                if improved:
                    save_checkpoint(state, best_path)
                save_checkpoint(state, last_path)
            saved = epoch                                         # what last.pt holds from now on
            if distributed.is_main():
                write_log(history, os.path.join(run_dir, "log.csv"))
            pace.advance()                                        # its time left: the pace of this call's epochs
            left = pace.left()
            log(f"epoch {epoch + 1:3d}/{run.epochs} | train loss {mean_loss:.4f} | "
                f"val {score_key.replace('balanced_accuracy', 'BA')} {score:.3f}{' *' if improved else '  '} | "
                f"{seconds:.1f} s | {left / 60:.1f} min left", quiet)
    except KeyboardInterrupt as exc:          # Ctrl-C or SIGTERM: safeio.run_cli says what is kept, in one line
        if not hasattr(exc, "progress"):                          # the epoch after the saved one was training
            when = f"in epoch {saved + 2}" if saved + 1 < run.epochs else f"after epoch {run.epochs}"
            exc.progress = f"{when} of {run.epochs}: " + (
                f"{last_path} holds epoch {saved + 1}" if saved >= 0 else f"nothing saved yet in {run_dir}")
        raise
    distributed.barrier()                                         # best.pt is written before anyone reads it
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
        if (step + 1) % every == 0 and distributed.world_size() == 1 and int(bad_step) >= 0:
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
    problem = distributed.first_reported(problem)
    if problem is None:
        return
    kept = f"last.pt still holds epoch {saved + 1}, the last good one" if saved >= 0 else "nothing was saved"
    raise UserError(f"{run_dir}: training diverged in epoch {epoch + 1}: {problem}{' ' + when if when else ''}; "
                    f"{kept}. Lower --lr (or look for extreme values in the inputs) and train again"
                    + (" into another --out" if saved >= 0 else ""))


def write_log(history, path):
    write_csv(history, list(dict.fromkeys(k for row in history for k in row)), path)
