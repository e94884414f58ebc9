"""Train one brain-age regressor conditioned on sex (Sec. 4.2).

    python train_brain_age.py                                     # HyperFusion on the synthetic cohort
    python train_brain_age.py --model imaging --version 3
    python train_brain_age.py --train-sex F                       # Fig. 4A: trained on women only
    python train_brain_age.py --data-csv ages.csv --image-dir preprocessed/

The cohort is split 80/10/10 by age and sex (Sec. 4.2.3, split seed 0 unless --split-seed; the synthetic demo splits
50/25/25, so that its validation and test sets of 200 show half a year); the epoch with the best validation MAE is
kept and tested. Output in <out>/brain-age/<model>/v<V>/ (with --train-sex or --embedding-dim 2 in the folder name):
best.pt, last.pt, log.csv, metrics.json (mae, mae_male, mae_female, the brain-age gap, and "age_bias": the linear
age-bias correction fitted on the validation set) and predictions.npz (test and validation).
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import ArgumentParser, UserError, atomic_path, run_cli, warn, write_json
from layers import init_hyperlayers
from metrics import age_bias_fit, gap_summary, regression_metrics, shown
from models import BRAIN_AGE_MODELS, AgeTarget
from training import (add_common_arguments, check_finite_outputs, fit, identity, is_main, load_checkpoint,
                      loader_workers, log, main_first, make_loader, predict, recalibrate_batchnorm, resumable,
                      train_run)

REAL_BRAIN_AGE = dict(epochs=70, batch_size=64, lr=1.5e-4, weight_decay=0.05, lr_schedule="constant")  # Table 1
# the demo: a cosine learning rate, so that its last epochs settle (at a constant 1e-3 the validation MAE still
# moved by up to 1.75 years over the last four epochs, and the best epoch was luck)
DEMO_BRAIN_AGE = dict(epochs=12, batch_size=16, lr=1e-3, weight_decay=1e-4, lr_schedule="cosine")
DEMO_SPLIT = (0.5, 0.25, 0.25)  # the demo's 800 subjects: 400 train, 200 validation, 200 test


def brain_age_arguments():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hyperfusion", choices=BRAIN_AGE_MODELS)
    p.add_argument("--embedding-dim", type=int, default=1, choices=[1, 2], help="sex embedding 2->1 or 2->2")
    p.add_argument("--train-sex", default="all", choices=["all", "M", "F", "mixed"],
                   help="Fig. 4A: train on males, females, or a sex-balanced mix, each of min(men, women) of the "
                        "training split (Sec. 4.2.4)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help=f"fractions (default: {' '.join(map(str, data.BRAIN_AGE_FRACTIONS))}, Sec. 4.2.3; "
                        f"the synthetic demo: {' '.join(map(str, DEMO_SPLIT))})")
    add_common_arguments(p)
    return p


def main(argv=None):
    return train_brain_age(vars(brain_age_arguments().parse_args(argv)))


def train_brain_age(args):
    """One brain-age run from its parsed options (vars(brain_age_arguments().parse_args())) in its claimed folder."""
    split = tuple(args.get("split") or (DEMO_SPLIT if args["data_csv"] is None else data.BRAIN_AGE_FRACTIONS))
    if not (all(f > 0 for f in split) and abs(sum(split) - 1) <= 1e-6):   # NaN fails both
        raise UserError(f"--split {' '.join(map(str, split))}: three positive fractions that sum to 1")
    return train_run(args, "brain-age", DEMO_BRAIN_AGE, REAL_BRAIN_AGE, run_brain_age,
                     embedding_dim=args["embedding_dim"], train_sex=args["train_sex"], split=split)


def run_brain_age(args, device, run):
    quiet, workers = args["quiet"], loader_workers(args["workers"], device)
    table = data.read_brain_age_table(run.data_csv, run.image_dir)
    train_idx, val_idx, test_idx = data.brain_age_split(table.age, table.sex, run.split_seed, run.split)
    if min(len(train_idx), len(val_idx), len(test_idx)) == 0:   # as train_ad.check_classes: before anything is written
        raise UserError(f"{run.data_csv}: {len(table.age)} subjects split into {len(train_idx)} training, "
                        f"{len(val_idx)} validation and {len(test_idx)} test subjects (--split "
                        f"{' '.join(map(str, run.split))}): each needs at least one; add subjects or change --split")
    if run.train_sex != "all":
        men, women = (table.sex[train_idx] == 0).sum(), (table.sex[train_idx] == 1).sum()
        train_idx = select_training_sex(train_idx, table.sex, run.train_sex, run.split_seed)
        kept = np.bincount(table.sex[train_idx], minlength=2)
        log(f"Fig. 4A: --train-sex {run.train_sex}: {len(train_idx)} training subjects ({kept[0]} male, {kept[1]} "
            f"female), min(men, women) of the training split's {men} men and {women} women", quiet)
    for code, name in ((0, "male"), (1, "female")):
        if not (table.sex == code).any():
            warn(f"{run.data_csv}: no {name} subjects: sex has nothing to condition on, and mae_{name} is null")
    # every header first (seconds), before the cache decodes: one shape and voxel size
    image_shape, voxel = data.check_image_geometry(table.image_paths, table.subjects)
    with main_first():  # torchrun: rank 0 decodes, the others then find every entry decoded
        cache = data.ImageCache(table.image_paths, data.cache_folder(run.cache_dir, run.data_csv),
                                transform=data.BRAIN_ZSCORE, names=table.subjects).prepare(not quiet)
    sex = data.sex_onehot(table.sex)                                            # (N, 2) [male, female]
    target = AgeTarget(centre=float(table.age[train_idx].mean()))
    inputs = {"n_tabular": 2, "image_shape": list(image_shape), "voxel_size": list(voxel),
              "target_scale": target.scale, "table_sha256": data.table_sha256(run.data_csv),
              "images_sha256": data.image_fingerprint(table.image_paths, cache.cache_dir, table.subjects)}
    run_dir = run.run_dir(args["out"])
    log(f"{run.model}: version {run.version}: {len(train_idx)} train / {len(val_idx)} val / "
        f"{len(test_idx)} test subjects, images {image_shape} -> {run_dir}", quiet)

    make = lambda idx: data.BrainAgeDataset(torch.utils.data.Subset(cache, idx), sex[idx], table.age[idx])
    loader = lambda idx, **kw: make_loader(make(idx), run.batch_size, workers, device, **kw)
    train_loader, val_loader, test_loader = loader(train_idx, shuffle=True), loader(val_idx), loader(test_idx)

    torch.manual_seed(run.version)                                  # the initialisation seed
    model = run.build_model(inputs).to(device)
    if run.model == "hyperfusion" and not resumable(run_dir, args["resume"]):
        init_hyperlayers(model, torch.as_tensor(sex[train_idx], device=device))  # Eq. 1-2, E[e^2] on training rows
    log(f"target: age - {target.centre:.1f} years (Eq. 4); weight decay {run.weight_decay:g} (Eq. 3)", quiet)
    loss_fn = lambda pred, age: F.mse_loss(pred.float(), target.encode(age))   # Eq. 4
    validate = lambda m: age_metrics(m, val_loader, device, target, table.sex[val_idx], run.precision)[0]
    statistics_loader = loader(train_idx)                  # the training set in order, for the BatchNorm statistics
    best = fit(model, train_loader, loss_fn, validate, "mae", run, run_dir, inputs, resume=args["resume"], quiet=quiet,
               state={"target": {"centre": target.centre, "scale": target.scale}}, sync_bn=args["sync_bn"],
               compile=args["compile"],
               lower_is_better=True, weight_decay=target.decay(run.weight_decay),  # Table 1's, in years
               before_validation=lambda m: recalibrate_batchnorm(m, statistics_loader, device, run.precision))

    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"), identity(run, inputs))["model"])
    test_metrics, pred = age_metrics(model, test_loader, device, target, table.sex[test_idx], run.precision)
    _, val_pred = age_metrics(model, val_loader, device, target, table.sex[val_idx], run.precision)
    bias = age_bias_fit(table.age[val_idx], val_pred)          # the gap's age bias, fitted on validation
    test_metrics["gap"] = gap_summary(table.age[test_idx], pred, table.sex[test_idx], bias)
    metrics = {"val": best["metrics"], "test": test_metrics, "best_epoch": best["epoch"], "age_bias": bias}
    if is_main():  # torchrun: every rank holds all predictions (gathered); one writes them
        with atomic_path(os.path.join(run_dir, "predictions.npz")) as tmp:
            np.savez(tmp, subjects=np.array(table.subjects)[test_idx], age=table.age[test_idx],
                     sex=table.sex[test_idx], pred=pred, val_subjects=np.array(table.subjects)[val_idx],
                     val_age=table.age[val_idx], val_sex=table.sex[val_idx], val_pred=val_pred)
        write_json(metrics, os.path.join(run_dir, "metrics.json"))
    log(f"test MAE {test_metrics['mae']:.2f} (male {shown(test_metrics['mae_male'], '.2f')}, female "
        f"{shown(test_metrics['mae_female'], '.2f')}) years, mean gap {test_metrics['gap']['gap']:+.2f}, "
        f"bias-corrected {test_metrics['gap']['corrected_gap']:+.2f}, best epoch {best['epoch'] + 1} -> {run_dir}")
    return metrics


def select_training_sex(train_idx, sex, which, seed):
    """Fig. 4A's training sets (Sec. 4.2.4, "maintaining equal-size training sets"): males only, females only, or a
    sex-balanced mix, each of n = min(men, women) of the training split, drawn with the run's split seed, so that the
    comparison is about sex and not about the amount of data. The mix takes ceil(n/2) men and floor(n/2) women.
    "all": the whole training split."""
    if which == "all":
        return train_idx
    males, females = train_idx[sex[train_idx] == 0], train_idx[sex[train_idx] == 1]
    n = min(len(males), len(females))
    if n == 0:
        raise UserError(f"--train-sex {which}: Fig. 4A's training sets are min(men, women) of the training "
                        f"split, and it holds {len(males)} male and {len(females)} female subjects")
    rng = np.random.default_rng(seed)
    parts = {"M": [(males, n)], "F": [(females, n)], "mixed": [(males, n - n // 2), (females, n // 2)]}[which]
    return np.sort(np.concatenate([rng.choice(part, k, replace=False) for part, k in parts]))


def age_metrics(model, loader, device, target, sex, precision):
    """Predicted ages in years (the network's output decoded by `target`) and their MAEs (Sec. 4.2.2)."""
    pred, age = predict(model, loader, device, target.decode, precision)
    check_finite_outputs(pred)
    return regression_metrics(age, pred, sex), pred


if __name__ == "__main__":
    run_cli(main, resume_option="--resume")
