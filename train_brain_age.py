"""Train one brain-age regressor conditioned on sex (Sec. 4.2).

    python train_brain_age.py                                     # HyperFusion on the synthetic cohort
    python train_brain_age.py --model imaging --version 3
    python train_brain_age.py --train-sex F                       # Fig. 4A: trained on women only
    python train_brain_age.py --data-csv ages.csv --image-dir preprocessed/

The cohort is split 80/10/10 by age and sex (Sec. 4.2.3, split seed 0 unless --split-seed); the
epoch with the best validation MAE is kept and tested. Output in <out>/brain-age/<model>/v<V>/
(with --train-sex or --embedding-dim 2 in the model's folder name): best.pt, last.pt, log.csv,
metrics.json ({"val": ..., "test": ...} with mae, mae_male, mae_female) and predictions.npz.
The loop, checkpoints and device handling are train_ad.py's.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import atomic_path
from evaluate import regression_metrics
from layers import init_hyperlayers
from models import BRAIN_AGE_MODELS, build_model
from train_ad import (add_common_arguments, autocast, cache_dir_for, fit, load_checkpoint, log, make_loader,
                      resolve_schedule, resuming, seed_all, setup_device, synthetic_cohort, write_json)

REAL_BRAIN_AGE = dict(epochs=70, batch_size=64, lr=1.5e-4, weight_decay=0.05)  # Table 1
DEMO_BRAIN_AGE = dict(epochs=12, batch_size=16, lr=1e-3, weight_decay=1e-4)


def brain_age_arguments():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hyperfusion", choices=BRAIN_AGE_MODELS)
    p.add_argument("--embedding-dim", type=int, default=1, choices=[1, 2], help="sex embedding 2->1 or 2->2")
    p.add_argument("--train-sex", default="all", choices=["all", "M", "F", "mixed"],
                   help="Fig. 4A: train on males, females, or a sex-balanced mix the size of the single-sex sets")
    p.add_argument("--split-seed", type=int, default=0)
    add_common_arguments(p)
    return p


def main(argv=None):
    return train_brain_age(vars(brain_age_arguments().parse_args(argv)))


def train_brain_age(args):
    cfg = dict(args, task="brain-age", args=dict(args))
    synthetic = cfg["data_csv"] is None
    if synthetic:
        cfg["data_csv"] = synthetic_cohort("brain-age", cfg["data_dir"])
    resolve_schedule(cfg, DEMO_BRAIN_AGE if synthetic else REAL_BRAIN_AGE, synthetic)
    device = setup_device(cfg)
    table = data.read_brain_age_table(cfg["data_csv"], cfg["image_dir"])
    train_idx, val_idx, test_idx = data.brain_age_split(table.age, table.sex, cfg["split_seed"])
    train_idx = select_training_sex(train_idx, table.sex, cfg["train_sex"], cfg["split_seed"])
    cache = data.ImageCache(table.image_paths, cache_dir_for(cfg), cfg["cache_dtype"],
                            names=table.subjects).prepare(progress=not cfg["quiet"])
    image_shape = tuple(cache[0].shape)
    sex = data.sex_onehot(table.sex)                                            # (N, 2) [male, female]
    run_dir = os.path.join(cfg["out"], "brain-age", run_folder(cfg["model"], cfg["embedding_dim"], cfg["train_sex"]),
                           f"v{cfg['version']}")
    cfg.update(n_tabular=2, image_shape=list(image_shape))
    log(cfg, f"{cfg['model']}: version {cfg['version']}: {len(train_idx)} train / {len(val_idx)} val / "
             f"{len(test_idx)} test subjects, images {image_shape} -> {run_dir}")

    make = lambda idx: data.BrainAgeDataset(torch.utils.data.Subset(cache, idx), sex[idx], table.age[idx])
    train_loader = make_loader(make(train_idx), cfg, device, shuffle=True)
    val_loader, test_loader = make_loader(make(val_idx), cfg, device), make_loader(make(test_idx), cfg, device)

    seed_all(cfg["version"])
    model = build_model("brain-age", cfg["model"], image_shape=image_shape,
                        embedding_dim=cfg["embedding_dim"]).to(device)
    if cfg["model"] == "hyperfusion" and not resuming(cfg, run_dir):
        init_hyperlayers(model, torch.as_tensor(sex[train_idx], device=device))  # Eq. 1-2, E[e^2] on training rows
    # the network predicts the age relative to the training mean, in decades: a better-conditioned target
    centre = float(table.age[train_idx].mean())
    loss_fn = lambda pred, age: F.mse_loss(pred.float(), (age - centre) / 10)   # Eq. 4
    validate = lambda m: predict_metrics(m, val_loader, device, centre, table.sex[val_idx])[0]
    best = fit(model, train_loader, loss_fn, validate, "mae", cfg, run_dir, extra={"age_centre": centre},
               lower_is_better=True)

    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"), cfg)["model"])
    test_metrics, pred = predict_metrics(model, test_loader, device, centre, table.sex[test_idx])
    with atomic_path(os.path.join(run_dir, "predictions.npz")) as tmp:
        np.savez(tmp, subjects=np.array(table.subjects)[test_idx], age=table.age[test_idx],
                 sex=table.sex[test_idx], pred=pred)
    metrics = {"val": best["metrics"], "test": test_metrics, "best_epoch": best["epoch"]}
    write_json(metrics, os.path.join(run_dir, "metrics.json"))
    log(cfg, f"test MAE {test_metrics['mae']:.2f} (male {test_metrics['mae_male']:.2f}, female "
             f"{test_metrics['mae_female']:.2f}) years, best epoch {best['epoch'] + 1} -> {run_dir}", force=True)
    return metrics


def run_folder(model, embedding_dim=1, train_sex="all"):
    """The run's folder under <out>/brain-age/: the model, then -emb2 and -train<M|F|mixed> for the ablations."""
    return model + (f"-emb{embedding_dim}" if embedding_dim != 1 else "") + \
        (f"-train{train_sex}" if train_sex != "all" else "")


def select_training_sex(train_idx, sex, which, seed):
    """Fig. 4A's training sets: males only, females only, or a sex-balanced mix of the same size."""
    if which == "all":
        return train_idx
    males, females = train_idx[sex[train_idx] == 0], train_idx[sex[train_idx] == 1]
    if which == "M":
        return males
    if which == "F":
        return females
    n = min(len(males), len(females))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(males, n // 2 + n % 2, replace=False),
                                   rng.choice(females, n // 2, replace=False)]))



@torch.no_grad()
def predict_metrics(model, loader, device, centre, sex):
    model.eval()
    preds, ages = [], []
    for image, tabular, age in loader:
        with autocast(device):
            out = model(image.to(device, non_blocking=True), tabular.to(device, non_blocking=True))
        preds.append(out.float().cpu() * 10 + centre)
        ages.append(age)
    pred, age = torch.cat(preds).numpy(), torch.cat(ages).numpy()
    return regression_metrics(age, pred, sex), pred


if __name__ == "__main__":
    data.run_cli(main)
