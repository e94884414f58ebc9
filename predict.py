"""Predict with finished runs: new patients through every member, combined (Eq. 6-8); a test set swept (Sec. 1).

    python predict.py runs/ad/hyperfusion/seed0/v0 --data-csv new.csv --out predictions.csv
    python predict.py runs/brain-age/hyperfusion --data-csv new_scans.csv --image-dir preprocessed/ --out ages.csv

Each RUN is a finished run folder (best.pt and metrics.json) or a folder above finished runs. Every member reads
each subject as it was trained (its tabular preprocessing and imputation, Sec. 3.3; its hippocampus boxes, both
sides averaged, Sec. 4.3.6; its image grid and target scale); the members are combined per subject by Eq. 7-8
(AD) or Eq. 6 (brain age). NEW.csv needs no diagnosis or age; with them, the metrics are printed too.

Output columns. AD: Subject, prob_<class>, predicted, n_models, prob_spread (the largest standard deviation of
a class probability across members), and ignored (columns a model cannot read, empty for every subject it was
trained on: read as missing) when a subject has one. Brain age: Subject, predicted_age, n_models, age_spread,
and when Age is given gap (predicted minus chronological age) and corrected_gap (minus the linear age bias fitted
on the runs' validation sets). A Subject a spreadsheet would run as a formula is written with a leading '. --out is
never the table, an image or a file of a run it reads. Bad input -> one line `error: ...`, exit status 2, no output.
"""
import argparse
import os
import time

import numpy as np
import torch

import data
from data import (AD_ATTRIBUTES, SEX_CODES, ArgumentParser, Progress, UserError, check_number,
                  check_output, parse_attribute, run_cli, warn, write_csv)
from metrics import (classification_metrics, corrected_gap, entropy_weighted_ensemble, fmt, gap_summary, mean_ensemble,
                     regression_metrics, shown)
from models import class_probabilities
from training import CALIBRATION_FILE, finished, load_run, make_loader, predict, replay_precision, setup_device


def find_runs(paths):
    """Every finished run named by `paths` (a run folder, a best.pt in one, or a folder above runs), in order, each
    once (by its real path: a fold named beside its group folder, or through a link, is one member of Eq. 7-8)."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            if not finished(os.path.dirname(os.path.abspath(path))):
                raise UserError(f"{path}: not the checkpoint of a finished run (no metrics.json beside it)")
            found.append(path)
        elif finished(path):
            found.append(path)
        elif os.path.isdir(path):
            below, seen = [], set()
            for root, dirs, files in os.walk(path, followlinks=True):       # runs linked into a folder too
                if os.path.realpath(root) in seen:                           # a loop of links: walked once
                    dirs.clear()
                elif "metrics.json" in files:
                    below.append(root)
                seen.add(os.path.realpath(root))
            below.sort()
            if not below:
                raise UserError(f"{path}: no finished run (a folder with best.pt and metrics.json) in or under it")
            found += below
        else:
            raise UserError(f"{path}: no such run folder")
    unique = {}
    for p in found:
        unique.setdefault(os.path.realpath(p if os.path.isfile(p) else os.path.join(p, "best.pt")), p)
    return [load_run(p) for p in unique.values()]


def check_members(members, calibrated=False):
    """All members answer one question (one task, one set of classes); calibrated: each an AD run with a temperature."""
    first = members[0]
    for m in members:
        for what, mine, theirs in (("task", m.run.task, first.run.task), ("classes", m.class_names, first.class_names)):
            if mine != theirs:
                raise UserError(f"cannot combine {first.dir} and {m.dir}: {what} {theirs} vs {mine}")
    for m in members if calibrated else ():
        if m.run.task != "ad":
            raise UserError(f"--calibrated: {m.dir} is a brain-age run; temperature scaling is for AD's probabilities")
        if m.temperature is None:
            raise UserError(f"--calibrated: {m.dir} has no temperature (no calibration.json); fit it with "
                            f"`python evaluate.py calibrate {m.dir}`")
        rec = m.read_json(CALIBRATION_FILE)
        if rec.get("at_bound") and rec.get("fitted", rec["temperature"]) < 1:     # training.calibrate
            raise UserError(f"--calibrated: {m.dir}: its temperature was fitted at the search's lower bound (a "
                            f"perfectly separated validation set: nothing to calibrate); predict without --calibrated")


PROGRESS_EVERY = 5.0   # seconds at least between two progress lines over the batches


def run_outputs(finished_run, model, images, inputs, targets, device, batch_size, transform, on_batch=None,
                sides=False):
    """A run's outputs for images (or None) and `inputs` (preprocessed rows for AD, sex codes for brain age),
    read as the run read its own test set -> (outputs, targets)."""
    ds = (data.BrainAgeDataset(images, data.sex_onehot(inputs), targets) if finished_run.run.task != "ad"
          else data.ADDataset(images, inputs, targets, train=False) if images is not None
          else data.TabularDataset(inputs, targets))
    return predict(model, make_loader(ds, batch_size, 0, device), device, transform,
                   replay_precision(finished_run.run.precision, device), on_batch, sides)


def member_outputs(members, table, cache_dir, batch_size, device, progress=True, calibrated=False):
    """Each member's predictions for every subject of `table`: (K, N, C) probabilities (at each member's
    temperature when calibrated) or (K, N) ages; images decoded once per distinct crop."""
    n, caches, outputs = len(table.subjects), {}, []
    done = Progress("predict", len(members), "members", not progress)
    shown = Progress(f"predicting {n} subjects x {len(members)} model{'s' * (len(members) > 1)}", n * len(members),
                     "predictions", not progress, every=PROGRESS_EVERY)
    for m in members:
        t0, images = time.time(), None
        if m.run.model != "tabular":
            per_image = m.crops or data.BRAIN_ZSCORE          # an AD image model's boxes, or brain age's z-score
            if per_image.cache_key() not in caches:
                caches[per_image.cache_key()] = data.ImageCache(table.image_paths, cache_dir, transform=per_image,
                                                                names=table.subjects).prepare(progress=progress)
                shown.rebase()                        # the pace of predicting, not of the first decode
            images = caches[per_image.cache_key()]
        if m.run.task == "ad":
            temperature = m.temperature if calibrated else 1.0                    # checked by check_members
            inputs, transform = m.tabular.transform(table.raw), lambda z, t=temperature: class_probabilities(z, t)
        else:
            inputs, transform = table.sex, m.target.decode
        out, _ = run_outputs(m, m.model(device), images, inputs, np.zeros(n, np.int64), device, batch_size,
                             transform, shown.advance)
        outputs.append(out)
        done.item_done(time.time() - t0, m.dir)
    return np.stack(outputs)


def test_set(finished_run, data_csv=None, image_dir=None, part="test"):
    """A finished run's test (or "val") set as its training built it -> (run, table, indices, images or None)."""
    run = finished_run.run.replace(data_csv=data_csv or finished_run.run.data_csv,
                                   image_dir=image_dir or finished_run.run.image_dir)
    held = finished_run.inputs.get("table_sha256")
    if held and os.path.isfile(run.data_csv) and data.table_sha256(run.data_csv) != held:
        raise UserError(f"{run.data_csv}: not the table {finished_run.checkpoint_path} was trained on "
                        f"(its sha256 differs); give that run's table with --data-csv")
    image_model = run.task != "ad" or run.model != "tabular"
    if run.task == "ad":
        table = data.read_ad_table(run.data_csv, run.image_dir, need_images=image_model, classes=run.classes,
                                   group_map=run.group_map)
        parts = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, run.split_seed), run.fold)
    else:
        table = data.read_brain_age_table(run.data_csv, run.image_dir)
        parts = data.brain_age_split(table.age, table.sex, run.split_seed, run.split)
    test_idx, images = parts[{"val": 1, "test": 2}[part]], None
    if image_model:  # the training run's cache (same folder and crops), so nothing is decoded again
        cache = data.ImageCache(table.image_paths, data.cache_folder(run.cache_dir, run.data_csv),
                                transform=finished_run.crops or data.BRAIN_ZSCORE, names=table.subjects)
        images = torch.utils.data.Subset(cache, test_idx)
    return run, table, test_idx, images


def sweep(checkpoint, attribute, values, data_csv=None, image_dir=None, batch_size=16, device="auto"):
    """The run's test set predicted as recorded and with every row's raw `attribute` set to each value (AD: e.g.
    ABETA 500, then the run's preprocessing; brain age: Sex M / F) -> {"header", "rows", "summary", ...}."""
    finished_run = load_run(checkpoint)
    if os.path.isfile(os.path.join(finished_run.dir, "last.pt")) and not finished(finished_run.dir):
        raise UserError(f"{checkpoint}: an unfinished run (last.pt, no metrics.json): its best.pt is not its trained "
                        f"model yet; finish its training first (the same command with --resume)")
    run, table, test_idx, images = test_set(finished_run, data_csv, image_dir)
    if os.path.isfile(os.path.join(finished_run.dir, "predictions.npz")):      # a damaged one: one error line
        if not np.array_equal(finished_run.read_predictions()["subjects"], np.array(table.subjects)[test_idx]):
            raise UserError(f"{checkpoint}: the rebuilt test set differs from the run's predictions.npz "
                            f"(another table than {run.data_csv}?)")
    dev, n, rows, summary = setup_device(device), len(test_idx), [], []
    model, first = finished_run.model(dev), None
    read = lambda inputs, targets, transform: run_outputs(finished_run, model, images, inputs, targets, dev,
                                                          batch_size, transform)
    if run.task == "ad":
        attr = next((a for a in AD_ATTRIBUTES if a.lower() == attribute.lower()), None)
        if attr is None:
            raise UserError(f"--attribute {attribute}: not a tabular attribute of the AD model "
                            f"(one of {', '.join(AD_ATTRIBUTES)})")
        if attr in finished_run.tabular.unlearned([]):
            raise UserError(f"--attribute {attr}: empty for every subject {checkpoint} was trained on: unreadable")
        for value in values:                  # PTGENDER too: refused before any scan is read
            try:
                parse_attribute(attr, str(value))
            except ValueError as exc:
                raise UserError(f"--values {value}: {attr}: {exc}") from None
        names = finished_run.class_names
        header = [attr, "n"] + [f"mean P({c})" for c in names] + [f"predicted {c}" for c in names] + ["BA"]
    else:
        if attribute.lower() not in ("sex", "ptgender"):
            raise UserError(f"--attribute {attribute}: the brain-age models take one attribute, Sex (values M F)")
        attr, bad = "Sex", [v for v in values if str(v).lower() not in SEX_CODES]
        if bad:
            raise UserError(f"--values {bad[0]}: expected M or F")
        sex, age = table.sex[test_idx], table.age[test_idx]
        header = [attr, "n", "mean predicted age", "true males", "true females", "MAE", "per-scan change vs first"]
    for value in [None] + list(values):
        cells = ["(as recorded)" if value is None else str(value), n]
        if run.task == "ad":
            raw = [dict(table.raw[i], **({} if value is None else {attr: str(value)})) for i in test_idx]
            try:
                tab = finished_run.tabular.transform(raw)
            except UserError as exc:
                raise UserError(f"--values {value}: {exc}") from None
            probs, labels = read(tab, table.labels[test_idx], class_probabilities)
            ba = classification_metrics(labels, probs, names)["balanced_accuracy"]
            frac = np.bincount(probs.argmax(1), minlength=len(names)) / n
            rows.append(cells + [f"{p:.3f}" for p in probs.mean(0)] + [f"{f:.0%}" for f in frac] + [fmt(ba)])
            summary.append({"value": value, "mean_probs": probs.mean(0).tolist(), "predicted_fraction": frac.tolist(),
                            "balanced_accuracy": ba})
            continue
        pred, _ = read(sex if value is None else np.full(n, SEX_CODES[str(value).lower()]), age,
                       finished_run.target.decode)
        mae = regression_metrics(age, pred, sex)["mae"]
        first = pred if value is not None and first is None else first
        diff = pred - first if value is not None else None
        mean_sex = [float(pred[sex == s].mean()) if (sex == s).any() else float("nan") for s in (0, 1)]
        rows.append(cells + [f"{pred.mean():.2f}", f"{mean_sex[0]:.2f}", f"{mean_sex[1]:.2f}", f"{mae:.2f}",
                             "-" if diff is None else f"{diff.mean():+.2f} ± {diff.std():.2f}"])
        summary.append({"value": value, "mean_pred": float(pred.mean()), "mean_pred_male": mean_sex[0],
                        "mean_pred_female": mean_sex[1], "mae": mae,
                        "change_vs_first": None if diff is None else float(diff.mean())})
    return {"task": run.task, "model": run.model, "place": run.run_dir(""), "checkpoint": checkpoint,
            "dir": finished_run.dir, "attribute": attr, "header": header, "rows": rows, "summary": summary}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders, or folders above them")
    p.add_argument("--data-csv", required=True, help="the new subjects (no diagnosis or age needed)")
    p.add_argument("--image-dir", help="folder of <Subject>.nii.gz (default: <csv folder>/images)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache)")
    p.add_argument("--out", required=True, help="the predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--calibrated", action="store_true",
                   help="AD: each member's probabilities at its temperature (calibration.json) before Eq. 7-8")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    check_number("--batch-size", a.batch_size, least=1)
    check_output("--out", a.out, [a.data_csv])
    t0 = time.time()
    members = find_runs(a.runs)
    check_members(members, a.calibrated)
    task, first = members[0].run.task, members[0]
    need_images = any(m.run.model != "tabular" for m in members)
    table = (data.read_ad_table(a.data_csv, a.image_dir, need_images, len(first.class_names), first.run.group_map,
                                for_prediction=True) if task == "ad"
             else data.read_brain_age_table(a.data_csv, a.image_dir, for_prediction=True))
    check_output("--out", a.out, (table.image_paths or []) + [os.path.join(m.dir, f) for m in members  # never over
                                                              for f in os.listdir(m.dir)]             # what it reads
                 + [m.checkpoint_path for m in members])
    if need_images:   # the table's images on one grid, the one every member was trained on (shape and voxel size)
        shape, voxel = data.check_image_geometry(table.image_paths, table.subjects)
        for m in members:
            train_shape, train_voxel = m.inputs.get("image_shape"), m.inputs.get("voxel_size")
            if train_shape and (shape != tuple(train_shape)
                                or (train_voxel and not np.allclose(voxel, train_voxel, atol=1e-3))):
                raise UserError(f"{table.image_paths[0]} (subject {table.subjects[0]}) and the table's other images: "
                                f"{shape} at {voxel} mm, but {m.dir} was trained on {tuple(train_shape)} at "
                                f"{train_voxel} mm; preprocess them the same way")
    outputs = member_outputs(members, table, data.cache_folder(a.cache_dir, a.data_csv), a.batch_size,
                             setup_device(a.device), progress=not a.quiet, calibrated=a.calibrated)
    spread = outputs.std(0).max(1) if task == "ad" else outputs.std(0)   # AD: a class probability's largest
    combined = entropy_weighted_ensemble(outputs) if task == "ad" else mean_ensemble(outputs)   # Eq. 7-8 / Eq. 6
    K, n = len(members), len(table.subjects)
    ignored = {}   # column -> (models that cannot read it, (N,) rows with a value they read as missing)
    for m in members if task == "ad" else ():
        for col, rows in m.tabular.unlearned(table.raw).items():
            ignored[col] = (ignored.get(col, (0,))[0] + 1, rows)
    ignored = {c: v for c, v in ignored.items() if v[1].any()}
    for col, (k, rows) in ignored.items():
        warn(f"{a.data_csv}: column {col}: {rows.sum()} of {n} subjects have a value that {k} of {K} models cannot "
             f"read (empty for every subject they were trained on): ignored, read as missing (column ignored of "
             f"{a.out})")
    known = table.labels >= 0 if task == "ad" else np.isfinite(table.age)   # the subjects with a diagnosis / an age
    if task == "ad":
        names = first.class_names
        header = ["Subject"] + [f"prob_{c}" for c in names] + ["predicted", "n_models", "prob_spread"]
        header += ["ignored"] * bool(ignored)
        rows = [[s] + [f"{q:.6f}" for q in pr] + [names[int(pr.argmax())], K, f"{sp:.6f}"]
                + [" ".join(c for c, (_, r) in ignored.items() if r[i])] * bool(ignored)
                for i, (s, pr, sp) in enumerate(zip(table.subjects, combined, spread))]
    else:
        # the Eq. 6 ensemble's age bias: the mean of its members' fits, each on its validation set (exact when
        # they share one, as the versions of a brain-age protocol do)
        fits = [m.read_metrics().get("age_bias") for m in members]
        bias = None if None in fits else {k: float(np.mean([f[k] for f in fits])) for k in ("intercept", "slope")}
        gaps = {"gap": combined - table.age} if known.any() else {}
        if gaps and bias is not None:
            gaps["corrected_gap"] = corrected_gap(table.age, combined, bias)
        header = ["Subject", "predicted_age", "n_models", "age_spread"] + list(gaps)
        cell = lambda v: f"{v:.3f}" if np.isfinite(v) else ""
        rows = [[s, f"{y:.3f}", K, f"{sp:.3f}"] + [cell(g[i]) for g in gaps.values()]
                for i, (s, y, sp) in enumerate(zip(table.subjects, combined, spread))]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_csv(rows, header, a.out, for_people=True)   # `=HYPERLINK(..)` as '=HYPERLINK(..): a spreadsheet shows it
    seconds = time.time() - t0
    print(f"{n} subjects x {K} models ({task}, {', '.join(sorted({m.run.model for m in members}))}) -> {a.out}, "
          f"{seconds:.1f} s ({n / seconds:.1f} subjects/s)")
    if task == "ad" and known.any():
        m = classification_metrics(table.labels[known], combined[known], names)
        print(f"ensemble on the {int(known.sum())} subjects with a diagnosis: BA {m['balanced_accuracy']:.3f} "
              f"AUC {shown(m['auc_macro'], '.3f', 'a class has no subject')} F1 {m['f1_macro']:.3f} precision "
              f"{m['precision']:.3f}; calibration{' (each member at its temperature)' if a.calibrated else ''}: "
              f"ECE {m['ece']:.3f} class-wise ECE {m['ece_classwise']:.3f} Brier {m['brier']:.3f} NLL {m['nll']:.3f}")
    elif task == "brain-age" and known.any():
        m = regression_metrics(table.age[known], combined[known], table.sex[known])
        print(f"ensemble on the {int(known.sum())} subjects with an age: MAE {m['mae']:.2f} (male "
              f"{shown(m['mae_male'], '.2f')}, female {shown(m['mae_female'], '.2f')}) years")
        if bias is not None:
            g = {k: shown(v, "+.2f") for k, v in gap_summary(table.age[known], combined[known], table.sex[known],
                                                              bias).items()}
            print(f"brain-age gap: mean {g['gap']} (male {g['gap_male']}, female {g['gap_female']}), bias-corrected "
                  f"{g['corrected_gap']} (male {g['corrected_gap_male']}, female {g['corrected_gap_female']}); "
                  f"r(gap, age) {g['r_gap_age']} -> {g['r_corrected_gap_age']}")
    return {"task": task, "subjects": table.subjects, "combined": combined, "spread": spread,
            "outputs": outputs, "members": [m.dir for m in members], "ignored": {c: r for c, (_, r) in ignored.items()}}


if __name__ == "__main__":
    run_cli(main)
