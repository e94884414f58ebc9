"""Train one AD classifier, CN / MCI / AD (Sec. 4.3), from hippocampus crops and clinical attributes.

    python train_ad.py --split-seed 0 --fold 2                  # HyperFusion on the synthetic cohort
    python train_ad.py --model tabular --data-csv ADNI.csv      # the table alone, no images needed
    python train_ad.py --model daft --data-csv ADNI.csv --image-dir nifti/ --split-seed 1 --fold 0

One run is one (model, split seed, version, fold) of the protocol (Sec. 4.3.4, 4.3.6, App. C.1): subset 4 of the
split is the test set, subset `fold` validates, the other three train. The epoch with the best validation balanced
accuracy is kept and tested. Everything lands in <out>/ad[-binary]/<model>[-<loss>]/seed<S>/v<V>/fold<F>/ (--classes
2, --loss ce or ce-oversample in the folder names): best.pt, last.pt, log.csv, metrics.json, predictions.npz (the
test probabilities that evaluate.py ensembles), logits.npz and calibration.json (the run's temperature, fitted on its
validation set).
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import ArgumentParser, TabularPreprocessor, UserError, atomic_path, run_cli, warn, write_json
from layers import init_hyperlayers
from metrics import classification_metrics
from models import AD_MODELS, class_probabilities
from training import (DATA_KEYS, add_common_arguments, alone, calibrate, check_finite_outputs, finished, fit, identity,
                      is_main, load_checkpoint, load_run, loader_workers, log, main_first, make_loader, predict,
                      resumable, save_logits, train_run)

REAL_AD = dict(epochs=250, batch_size=32, lr=1e-4, weight_decay=1e-5, lr_schedule="constant")  # Table 1
DEMO_AD = dict(epochs=25, batch_size=16, lr=1e-3, weight_decay=1e-5, lr_schedule="constant")   # the synthetic cohort
DEMO_TABULAR = dict(DEMO_AD, epochs=100)  # the MLP costs nothing per epoch


def ad_arguments():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hyperfusion", choices=AD_MODELS)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 5-subset split (Sec. 4.3.4)")
    p.add_argument("--fold", type=int, default=0, choices=range(4), help="validation subset, 0..3")
    p.add_argument("--loss", default="wce", choices=["wce", "ce", "ce-oversample"], help="Eq. 5, or App. C.4")
    p.add_argument("--classes", type=int, default=3, choices=[3, 2], help="2: CN vs AD (App. B)")
    p.add_argument("--group-map", nargs="+", metavar="VALUE=DX",
                   help="read other Group values as a diagnosis, e.g. SMC=CN (default: such rows are skipped)")
    p.add_argument("--crops", help="crops.json with the hippocampus boxes (default: next to the CSV)")
    add_common_arguments(p)
    return p


def main(argv=None):
    return train_ad(vars(ad_arguments().parse_args(argv)))


def train_ad(args):
    """One AD run from its parsed options (a dict, as vars(ad_arguments().parse_args())) in its claimed folder."""
    demo = DEMO_TABULAR if args["model"] == "tabular" else DEMO_AD      # the schedule resolved for data and model
    data.check_number("--batch-size", args["batch_size"], least=2)   # one sample stops a BatchNorm1d in training
    return train_run(args, "ad", demo, REAL_AD, run_ad, fold=args["fold"], classes=args["classes"], loss=args["loss"],
                     group_map=data.parse_group_map(args["group_map"]) or None, crops=args["crops"])


def run_ad(args, device, run):
    quiet, workers, image_model = args["quiet"], loader_workers(args["workers"], device), run.model != "tabular"
    table = data.read_ad_table(run.data_csv, run.image_dir, need_images=image_model, classes=run.classes,
                               group_map=run.group_map)
    log(data.skipped_summary(table), quiet or not table.skipped)
    check_classes(table)
    train_idx, val_idx, test_idx = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, run.split_seed),
                                                run.fold)
    check_classes(table, {"training": train_idx, "validation": val_idx, "test": test_idx}, run)
    prep = TabularPreprocessor().fit([table.raw[i] for i in train_idx])  # Sec. 3.3: training rows only
    tabular = prep.transform(table.raw)                                   # (N, n_tab)
    for a in prep.state["empty"] if is_main() else ():             # torchrun: said once, by rank 0
        warn(f"{run.data_csv}: column {a} is empty for every training subject: this run cannot learn it and reads "
             f"every value of it as missing (metrics.json: unlearned_columns)")
    crops = data.load_crops(run.crops, run.data_csv) if image_model else None
    # every header first (seconds), so that a wrong image stops the run before the cache decodes
    shape, voxel = data.check_image_geometry(table.image_paths, table.subjects) if image_model else (None, None)
    if image_model:
        crops.check(shape, data.crops_path(run.crops, run.data_csv) or "the default (MNI152) hippocampus boxes")
    inputs = {"n_tabular": int(tabular.shape[1]), "tabular_columns": prep.columns,
              "class_names": list(table.class_names), "crops": crops.as_dict() if crops else None,
              "image_shape": list(shape) if shape else None, "voxel_size": list(voxel) if voxel else None,
              "table_sha256": data.table_sha256(run.data_csv),
              "images_sha256": data.image_fingerprint(table.image_paths, data.cache_folder(run.cache_dir, run.data_csv),
                                                      table.subjects, not quiet) if image_model else None}
    run_dir = run.run_dir(args["out"])
    log(f"{run.model}: split seed {run.split_seed}, fold {run.fold}, version {run.version}: "
        f"{len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test subjects, "
        f"{inputs['n_tabular']} tabular features -> {run_dir}", quiet)

    # Sec. 4.3.6: the HyperFusion embedding starts from the tabular-only MLP of this split and fold
    # (found or trained before the images are decoded, so a tabular model of another table stops the run at once)
    tab_model = pretrained_tabular(args, run, inputs) if run.model == "hyperfusion" and \
        not resumable(run_dir, args["resume"]) else None

    if image_model:
        with main_first():  # torchrun: rank 0 decodes, the others then find every entry decoded
            cache = data.ImageCache(table.image_paths, data.cache_folder(run.cache_dir, run.data_csv),
                                    transform=crops, names=table.subjects).prepare(not quiet)
        make = lambda idx, train: data.ADDataset(torch.utils.data.Subset(cache, idx), tabular[idx],
                                                 table.labels[idx], train=train)
    else:
        make = lambda idx, train: data.TabularDataset(tabular[idx], table.labels[idx])
    train_set, val_set, test_set = make(train_idx, True), make(val_idx, False), make(test_idx, False)

    # Eq. 5: class weights inversely proportional to the class frequencies of training + validation
    counts = np.bincount(table.labels[np.concatenate([train_idx, val_idx])], minlength=run.classes)
    class_weights = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32).to(device)
    loss_fn = (lambda logits, y: wce_loss(logits, y, class_weights)) if run.loss == "wce" else F.cross_entropy
    sampler = None
    if run.loss == "ce-oversample":  # App. C.4: rare classes drawn as often as common ones
        w = 1.0 / np.maximum(np.bincount(table.labels[train_idx], minlength=run.classes)[table.labels[train_idx]], 1)
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), len(w))

    torch.manual_seed(run.version)  # the initialisation seed, the same whether the MLP was trained now or reused
    model = run.build_model(inputs).to(device)
    if tab_model is not None:
        model.load_embedding(tab_model)
        measured = init_hyperlayers(model, torch.as_tensor(tabular[train_idx], device=device))  # Eq. 1-2
        log("hyperlayer init (Eq. 1-2), E[e^2] on the training rows: "
            + ", ".join(f"{k} {v:.3g}" for k, v in measured.items()), quiet)

    loader = lambda ds, **kw: make_loader(ds, run.batch_size, workers, device, **kw)
    train_loader, val_loader = loader(train_set, shuffle=sampler is None, sampler=sampler), loader(val_set)
    validate = lambda m: ad_metrics(m, val_loader, device, inputs["class_names"], run.precision)[0]
    best = fit(model, train_loader, loss_fn, validate, "balanced_accuracy", run, run_dir, inputs,
               state={"tabular": prep.state_dict()}, resume=args["resume"], quiet=quiet, sync_bn=args["sync_bn"],
               compile=args["compile"])

    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"), identity(run, inputs))["model"])
    test_metrics, test_probs = ad_metrics(model, loader(test_set), device, inputs["class_names"], run.precision)
    metrics = {"val": best["metrics"], "test": test_metrics, "best_epoch": best["epoch"],
               "unlearned_columns": prep.state["empty"]}
    logits = {part: predict(model, loader(ds), device, None, run.precision, sides=True)       # (N, [2,] C)
              for part, ds in (("val", val_set), ("test", test_set))}
    if is_main():  # torchrun: every rank holds all test predictions (gathered); one writes them
        with atomic_path(os.path.join(run_dir, "predictions.npz")) as tmp:
            np.savez(tmp, subjects=np.array(table.subjects)[test_idx], labels=table.labels[test_idx], probs=test_probs)
        save_logits(run_dir, logits["val"], logits["test"])
        metrics["temperature"] = calibrate(run_dir, logits)["temperature"]    # on the validation set
        write_json(metrics, os.path.join(run_dir, "metrics.json"))
    log(f"test BA {test_metrics['balanced_accuracy']:.3f} AUC {test_metrics['auc_macro']:.3f} "
        f"F1 {test_metrics['f1_macro']:.3f} (best epoch {best['epoch'] + 1}, val BA "
        f"{best['metrics']['balanced_accuracy']:.3f}) -> {run_dir}")
    return metrics


def check_classes(table, parts=None, run=None):
    """Every class of the task in the cohort and, after the split, in each of `parts` ({name: indices}): a class absent
    from training cannot be learnt, and one absent from validation or test leaves BA and AUC undefined."""
    names = table.class_names
    counts = np.bincount(table.labels[table.labels >= 0], minlength=len(names))
    if (counts > 0).sum() < 2:
        raise UserError(f"{table.csv_path}: every subject is {names[int(np.argmax(counts))]}: "
                        f"a classifier needs subjects of at least two classes")
    for k, c in enumerate(names):
        if counts[k] == 0:
            raise UserError(f"{table.csv_path}: no {c} subjects, but --classes {len(names)} needs them"
                            + (" (--classes 2: CN vs AD)" if c == "MCI" else ""))
    for part, idx in (parts or {}).items():
        for k, c in enumerate(names):
            if not (table.labels[idx] == k).any():
                raise UserError(f"{table.csv_path}: class {c} is absent from the {part} subset (split seed "
                                f"{run.split_seed}, fold {run.fold}): the cohort has {counts[k]} {c} subject"
                                f"{'s' * int(counts[k] != 1)}; each of the 5 subsets needs one, and the split deals "
                                f"each (sex, age) stratum apart, so it takes more")


def wce_loss(logits, target, weights):
    """Eq. 5, divided by the batch size B as written (F.cross_entropy(weight=w) divides by the weights' sum)."""
    return -(weights[target] * F.log_softmax(logits.float(), 1).gather(1, target[:, None]).squeeze(1)).mean()


def ad_metrics(model, loader, device, class_names, precision):
    """Soft predictions of a loader's subjects, both hippocampi averaged (Sec. 4.3.6), and their metrics."""
    probs, labels = predict(model, loader, device, class_probabilities, precision)
    check_finite_outputs(probs)                 # NaN probabilities would be scikit-learn's traceback
    return classification_metrics(labels, probs, class_names), probs


def pretrained_tabular(args, run, inputs):
    """The tabular-only MLP of the same split seed, fold and version: reused if trained, else trained now."""
    tab_run = run.replace(model="tabular")
    run_dir = tab_run.run_dir(args["out"])
    with main_first():  # torchrun: rank 0 pre-trains it alone while the others wait, then all load it
        if not finished(run_dir):
            log(f"pre-training the tabular embedding (Sec. 4.3.6) -> {run_dir}", args["quiet"])
            with alone():
                train_ad(dict(args, model="tabular", resume=resumable(run_dir, True)))   # an interrupted one goes on
        else:
            log(f"reusing the tabular embedding of {run_dir}", args["quiet"])
    return load_run(run_dir, expected=identity(tab_run, inputs, DATA_KEYS)).model()


if __name__ == "__main__":
    run_cli(main, resume_option="--resume")
