"""What defines a run: its options (RunConfig), where it lives, the options both training scripts take, its schedule.

A run is a RunConfig: the options that define it. Every checkpoint holds it with the facts the run learned from
its data (`inputs`), and a checkpoint whose identity (IDENTITY_KEYS) differs from a run's is refused: resuming,
predicting and ensembling never mix two runs. The schedule is Table 1's on real data, the demo's on the
built-in synthetic cohorts (each training script's defaults), with a learning rate per epoch (learning_rate).
"""
import dataclasses
import math
import os
from dataclasses import dataclass

from distributed import log
from models import build_model
from precision import keep_float32
from safeio import check_number

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
                             "precision")      # the arithmetic it trained in (precision.resolve_precision)


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
        recipe keeps in float32 marked so (precision.keep_float32)."""
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
                        "(precision.AUTO); bf16, fp16 (CUDA), or a recipe such as bf16+fp32:hyper,bn")
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
