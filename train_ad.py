"""Train one AD classifier, CN / MCI / AD (Sec. 4.3), from hippocampus crops and clinical attributes.

    python train_ad.py --split-seed 0 --fold 2                  # HyperFusion on the synthetic cohort
    python train_ad.py --model tabular --data-csv ADNI.csv      # the table alone, no images needed
    python train_ad.py --model daft --data-csv ADNI.csv --image-dir nifti/ --split-seed 1 --fold 0

One run is one (model, split seed, version, fold) of the protocol (Sec. 4.3.4, 4.3.6, App. C.1):
subset 4 of the split is the test set, subset `fold` validates, the other three train. The epoch
with the best validation balanced accuracy is kept and evaluated on the test subset at the end.
Everything lands in <out>/ad/<model>/seed<S>/v<V>/fold<F>/: best.pt, last.pt, log.csv,
metrics.json and predictions.npz (the test probabilities that evaluate.py ensembles).

The second half of this file is the training machinery that train_brain_age.py shares.
"""
import argparse
import csv
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import DataError, atomic_path
from evaluate import classification_metrics
from layers import init_hyperlayers
from models import AD_MODELS, build_model

# Table 1 (real data) and the demo schedule used on the built-in synthetic cohort
REAL_AD = dict(epochs=250, batch_size=32, lr=1e-4, weight_decay=1e-5)
DEMO_AD = dict(epochs=25, batch_size=16, lr=1e-3, weight_decay=1e-5)
DEMO_TABULAR = dict(DEMO_AD, epochs=100)  # the MLP costs nothing per epoch
DEMO_AD_COHORT = dict(n=600, seed=0)


def ad_arguments():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hyperfusion", choices=AD_MODELS)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 5-subset split (Sec. 4.3.4)")
    p.add_argument("--fold", type=int, default=0, choices=range(4), help="validation subset, 0..3")
    p.add_argument("--loss", default="wce", choices=["wce", "ce", "ce-oversample"], help="Eq. 5, or App. C.4")
    p.add_argument("--classes", type=int, default=3, choices=[3, 2], help="2: CN vs AD (App. B)")
    add_common_arguments(p)
    return p


def main(argv=None):
    cfg = vars(ad_arguments().parse_args(argv))
    return train_ad(cfg)


def train_ad(args):
    cfg = dict(args, task="ad", args=dict(args))
    synthetic = cfg["data_csv"] is None
    if synthetic:
        cfg["data_csv"] = synthetic_cohort("ad", cfg["data_dir"])
    resolve_schedule(cfg, (DEMO_TABULAR if cfg["model"] == "tabular" else DEMO_AD) if synthetic else REAL_AD, synthetic)
    device = setup_device(cfg)
    image_model = cfg["model"] != "tabular"
    table = data.read_ad_table(cfg["data_csv"], cfg["image_dir"], need_images=image_model, classes=cfg["classes"])
    subsets = data.ad_split(table.sex, table.labels, table.age, cfg["split_seed"])
    train_idx, val_idx, test_idx = data.ad_fold(subsets, cfg["fold"])
    prep = data.TabularPreprocessor().fit([table.raw[i] for i in train_idx])  # Sec. 3.3: training rows only
    tabular = prep.transform(table.raw)                                        # (N, n_tab)
    cfg.update(n_tabular=int(tabular.shape[1]), tabular_columns=prep.columns, class_names=list(table.class_names))
    run_dir = ad_run_dir(cfg["out"], cfg["model"], cfg["split_seed"], cfg["version"], cfg["fold"], cfg["classes"] == 2)
    log(cfg, f"{cfg['model']}: split seed {cfg['split_seed']}, fold {cfg['fold']}, version {cfg['version']}: "
             f"{len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test subjects, "
             f"{cfg['n_tabular']} tabular features -> {run_dir}")

    if image_model:
        crops = hippocampus_crops(cfg["crops"], cfg["data_csv"])
        cache = data.ImageCache(table.image_paths, cache_dir_for(cfg), cfg["cache_dtype"], transform=crops,
                                names=table.subjects).prepare(progress=not cfg["quiet"])
        make = lambda idx, train: data.ADDataset(torch.utils.data.Subset(cache, idx), tabular[idx],
                                                 table.labels[idx], train=train)
    else:
        make = lambda idx, train: data.TabularDataset(tabular[idx], table.labels[idx])
    train_set, val_set, test_set = make(train_idx, True), make(val_idx, False), make(test_idx, False)

    # Eq. 5: class weights inversely proportional to the class frequencies of training + validation
    counts = np.bincount(table.labels[np.concatenate([train_idx, val_idx])], minlength=cfg["classes"])
    class_weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                                 device=device)
    loss_fn = (lambda logits, y: wce_loss(logits, y, class_weights)) if cfg["loss"] == "wce" else F.cross_entropy
    sampler = None
    if cfg["loss"] == "ce-oversample":  # App. C.4: rare classes drawn as often as common ones
        train_counts = np.bincount(table.labels[train_idx], minlength=cfg["classes"])
        w = 1.0 / np.maximum(train_counts[table.labels[train_idx]], 1)
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(w))

    # Sec. 4.3.6: the HyperFusion embedding starts from the tabular-only MLP of this split and fold
    tab_model = pretrained_tabular(cfg) if cfg["model"] == "hyperfusion" and not resuming(cfg, run_dir) else None
    seed_all(cfg["version"])  # the initialisation seed, the same whether the MLP was trained now or reused
    model = build_model("ad", cfg["model"], n_tabular=cfg["n_tabular"], n_classes=cfg["classes"]).to(device)
    if tab_model is not None:
        model.load_embedding(tab_model)
        measured = init_hyperlayers(model, torch.as_tensor(tabular[train_idx], device=device))  # Eq. 1-2
        log(cfg, "hyperlayer init (Eq. 1-2), E[e^2] on the training rows: "
                 + ", ".join(f"{k} {v:.3g}" for k, v in measured.items()))

    train_loader = make_loader(train_set, cfg, device, shuffle=sampler is None, sampler=sampler)
    val_loader = make_loader(val_set, cfg, device)
    names = list(table.class_names)
    validate = lambda m: ad_predict_metrics(m, val_loader, device, names)[0]
    best = fit(model, train_loader, loss_fn, validate, "balanced_accuracy", cfg, run_dir,
               extra={"tabular": prep.state_dict()})

    ckpt = load_checkpoint(os.path.join(run_dir, "best.pt"), cfg)
    model.load_state_dict(ckpt["model"])
    test_metrics, test_probs = ad_predict_metrics(model, make_loader(test_set, cfg, device), device, names)
    with atomic_path(os.path.join(run_dir, "predictions.npz")) as tmp:
        np.savez(tmp, subjects=np.array(table.subjects)[test_idx], labels=table.labels[test_idx], probs=test_probs)
    metrics = {"val": best["metrics"], "test": test_metrics, "best_epoch": best["epoch"]}
    write_json(metrics, os.path.join(run_dir, "metrics.json"))
    log(cfg, f"test BA {test_metrics['balanced_accuracy']:.3f} AUC {test_metrics['auc_macro']:.3f} "
             f"F1 {test_metrics['f1_macro']:.3f} (best epoch {best['epoch'] + 1}, val BA "
             f"{best['metrics']['balanced_accuracy']:.3f}) -> {run_dir}", force=True)
    return metrics


def ad_run_dir(out, model, split_seed, version, fold, binary=False):
    """Where one run lives: <out>/ad[-binary]/<model>/seed<S>/v<V>/fold<F>."""
    return os.path.join(out, "ad-binary" if binary else "ad", model, f"seed{split_seed}", f"v{version}", f"fold{fold}")


def hippocampus_crops(crops_json, data_csv):
    """The two hippocampus boxes: --crops, else crops.json next to the CSV, else the MNI152 default."""
    path = crops_json or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "crops.json")
    return data.HippocampusCrops.load(path) if (crops_json or os.path.isfile(path)) else data.HippocampusCrops.mni152_1mm()


def wce_loss(logits, target, weights):
    """Eq. 5, divided by the batch size B as written (F.cross_entropy(weight=w) would divide by the
    sum of the targets' weights instead)."""
    return -(weights[target] * F.log_softmax(logits.float(), 1).gather(1, target[:, None]).squeeze(1)).mean()


@torch.no_grad()
def ad_predict_metrics(model, loader, device, class_names):
    """Soft predictions of a loader's subjects, both hippocampi averaged (Sec. 4.3.6), and their metrics."""
    model.eval()
    probs, labels = [], []
    for image, tabular, target in loader:
        tabular = tabular.to(device, non_blocking=True)
        if image.dim() == 6:                                       # (B, 2, 1, D, H, W): both sides
            B = image.shape[0]
            image = image.flatten(0, 1).to(device, non_blocking=True)               # (2B, 1, D, H, W)
            with autocast(device):
                p = F.softmax(model(image, tabular.repeat_interleave(2, 0)).float(), 1)
            p = p.view(B, 2, -1).mean(1)                           # (B, C)
        else:
            with autocast(device):
                p = F.softmax(model(image.to(device), tabular).float(), 1)
        probs.append(p.cpu())
        labels.append(target)
    probs, labels = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return classification_metrics(labels, probs, class_names), probs


def pretrained_tabular(cfg):
    """The tabular-only MLP of the same split seed, fold and version: reused if trained, else trained now."""
    run_dir = ad_run_dir(cfg["out"], "tabular", cfg["split_seed"], cfg["version"], cfg["fold"], cfg["classes"] == 2)
    path = os.path.join(run_dir, "best.pt")
    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        log(cfg, f"pre-training the tabular embedding (Sec. 4.3.6) -> {run_dir}")
        train_ad(dict(cfg["args"], model="tabular", resume=False))
    else:
        log(cfg, f"reusing the tabular embedding of {run_dir}")
    ckpt = load_checkpoint(path, dict(cfg, model="tabular"), keys=DATA_KEYS)
    tab = build_model("ad", "tabular", n_tabular=cfg["n_tabular"], n_classes=cfg["classes"])
    tab.load_state_dict(ckpt["model"])
    return tab


# ================================================================================================
# Training machinery shared with train_brain_age.py

SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "weight_decay")
# a checkpoint belongs to a run when these match; anything else may change on --resume
DATA_KEYS = ("task", "model", "split_seed", "fold", "version", "classes", "n_tabular", "tabular_columns",
             "embedding_dim", "train_sex")
IDENTITY_KEYS = DATA_KEYS + ("loss", "batch_size", "lr", "weight_decay")


def add_common_arguments(p):
    p.add_argument("--version", type=int, default=0, help="initialisation seed (Sec. 4.3.6 'versions')")
    p.add_argument("--data-csv", help="the table; default: the built-in synthetic cohort")
    p.add_argument("--image-dir", help="folder of <Subject>.nii.gz (default: <csv folder>/images)")
    p.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    p.add_argument("--crops", help="crops.json with the hippocampus boxes (default: next to the CSV)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    for k in SCHEDULE_KEYS:
        p.add_argument("--" + k.replace("_", "-"), type=type(REAL_AD[k]), help="default: Table 1, or the demo")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 4 on CUDA, 0 on CPU)")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true", help="continue from last.pt")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def resolve_schedule(cfg, defaults, synthetic):
    """Fill unset schedule options from Table 1 (real data) or the demo schedule (synthetic)."""
    for k in SCHEDULE_KEYS:
        if cfg[k] is None:
            cfg[k] = defaults[k]
    cfg["schedule"] = "demo (synthetic cohort)" if synthetic else "Table 1"
    log(cfg, f"schedule ({cfg['schedule']}): " + ", ".join(f"{k} {cfg[k]}" for k in SCHEDULE_KEYS))


def synthetic_cohort(task, data_dir):
    """The built-in synthetic cohort, generated on first use (SPEC §4)."""
    name = {"ad": ("synthetic_ad", "ad.csv"), "brain-age": ("synthetic_brain_age", "brain_age.csv")}[task]
    csv_path = os.path.abspath(os.path.join(data_dir, *name))
    if not os.path.isfile(csv_path):
        print(f"generating the synthetic {task} cohort in {os.path.dirname(csv_path)} (first use only) ...",
              flush=True)
        t0 = time.time()
        if task == "ad":
            data.make_synthetic_ad(os.path.dirname(csv_path), **DEMO_AD_COHORT)
        else:
            data.make_synthetic_brain_age(os.path.dirname(csv_path), n=400, seed=0)
        print(f"generated in {time.time() - t0:.0f} s", flush=True)
    return csv_path


def cache_dir_for(cfg):
    return cfg["cache_dir"] or os.path.join(os.path.dirname(os.path.abspath(cfg["data_csv"])), "cache")


def setup_device(cfg):
    """auto: CUDA when present. On CUDA: cudnn.benchmark, mixed precision, pinned memory, workers."""
    name = cfg["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg["workers"] is None:
        cfg["workers"] = 4 if device.type == "cuda" else 0
    return device


def autocast(device):
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_loader(dataset, cfg, device, shuffle=False, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=shuffle, sampler=sampler,
                                       num_workers=cfg["workers"], pin_memory=device.type == "cuda",
                                       drop_last=shuffle and len(dataset) > cfg["batch_size"],
                                       persistent_workers=cfg["workers"] > 0)


def log(cfg, message, force=False):
    if force or not cfg.get("quiet"):
        print(message, flush=True)


def write_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def save_checkpoint(obj, path):
    """Atomic: a temporary file, then a rename, so an interruption never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, cfg=None, keys=IDENTITY_KEYS):
    """Load a checkpoint of ours; a corrupt file or one from another run stops with a clear error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise DataError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__}); "
                        f"delete it to start the run afresh") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch"} <= set(ckpt):
        raise DataError(f"{path}: not a checkpoint written by this code")
    if cfg is not None:
        diff = [f"{k}: checkpoint {ckpt['config'].get(k)!r}, now {cfg.get(k)!r}" for k in keys
                if k in cfg and ckpt["config"].get(k) != cfg.get(k)]
        if diff:
            raise DataError(f"{path}: checkpoint belongs to another run ({'; '.join(diff)})")
    return ckpt


def resuming(cfg, run_dir):
    return cfg["resume"] and os.path.isfile(os.path.join(run_dir, "last.pt"))


def fit(model, train_loader, loss_fn, validate, score_key, cfg, run_dir, extra, lower_is_better=False):
    """The hand-written training loop of both tasks.

    Adam with weight decay lambda on every trained parameter, internal and hypernetwork alike
    (Eq. 3: the generated weights are not parameters, so they are not decayed). Each epoch's
    randomness (shuffling, dropout, the hippocampus side) is seeded from (version, epoch), so a run
    resumed from last.pt ends exactly as an uninterrupted one on CPU. Keeps the best epoch by
    validate(model)[score_key]; writes best.pt, last.pt and log.csv in run_dir every epoch.
    """
    os.makedirs(run_dir, exist_ok=True)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start, best, history = 0, None, []
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if resuming(cfg, run_dir):
        ckpt = load_checkpoint(last_path, cfg)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        log(cfg, f"resuming {last_path} after epoch {start}")
    elif cfg.get("resume"):
        log(cfg, f"--resume: no {last_path} yet, starting afresh")
    config = {k: v for k, v in cfg.items() if k != "args"}
    t_start = time.time()
    for epoch in range(start, cfg["epochs"]):
        t0 = time.time()
        torch.manual_seed(cfg["version"] * 1_000_003 + epoch)
        model.train()
        total, n = 0.0, 0
        for image, tabular, target in train_loader:
            image = image.to(device, non_blocking=True)
            tabular, target = tabular.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with autocast(device):
                loss = loss_fn(model(image, tabular), target)
            if not torch.isfinite(loss):
                raise RuntimeError(f"epoch {epoch + 1}: the loss is {loss.item()}; lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total, n = total + loss.item() * len(target), n + len(target)
        metrics = validate(model)
        score = metrics[score_key]
        improved = best is None or (score < best["score"] if lower_is_better else score > best["score"])
        if improved:
            best = {"epoch": epoch, "score": score, "metrics": metrics}
        seconds = time.time() - t0
        history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), score_key: score, "seconds": seconds,
                        **{k: v for k, v in metrics.items() if isinstance(v, float) and k != score_key}})
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": config, "epoch": epoch,
                 "best": best, "history": history, **extra}
        if improved:
            save_checkpoint(state, best_path)
        save_checkpoint(state, last_path)
        write_log(history, os.path.join(run_dir, "log.csv"))
        done = epoch + 1 - start
        left = (time.time() - t_start) / done * (cfg["epochs"] - epoch - 1)
        log(cfg, f"epoch {epoch + 1:3d}/{cfg['epochs']} | train loss {total / max(n, 1):.4f} | "
                 f"val {score_key.replace('balanced_accuracy', 'BA')} {score:.3f}{' *' if improved else '  '} | "
                 f"{seconds:.1f} s | {left / 60:.1f} min left")
    if best is None:
        raise DataError(f"{run_dir}: no epoch was trained (epochs = {cfg['epochs']})")
    return best


def write_log(history, path):
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


if __name__ == "__main__":
    data.run_cli(main)
