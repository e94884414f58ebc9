"""Predict for new patients: every finished run applies its own saved state, then the members are combined (Eq. 6-8).

    python predict.py runs/ad/hyperfusion/seed0/v0 --data-csv new.csv --out predictions.csv
    python predict.py runs/brain-age/hyperfusion --data-csv new_scans.csv --image-dir preprocessed/ --out ages.csv

Each RUN is a finished run folder (its best.pt and metrics.json), or a folder under which every
finished run is taken (runs/ad/hyperfusion/seed0 = its versions x folds). Every member reads each
subject with the state it was trained with: its tabular preprocessing and imputation (Sec. 3.3), its
hippocampus boxes with both sides averaged (Sec. 4.3.6), its image shape and voxel size, its target
scale. The members are then combined per subject: Eq. 7-8 (entropy-weighted) for AD, Eq. 6 (mean)
for brain age. NEW.csv needs no diagnosis or age; when it has them, the metrics are printed too.

Output columns. AD: Subject, prob_<class> for each class, predicted, n_models, prob_spread (the
largest standard deviation of a class probability across members). Brain age: Subject,
predicted_age, n_models, age_spread, and when Age is given gap (predicted minus chronological age)
and corrected_gap (minus the linear age bias fitted on the runs' validation sets).
Bad input -> one line `error: ...` on stderr, exit status 2, and no output file.
"""
import argparse
import os
import time

import numpy as np

import data
from metrics import (classification_metrics, corrected_gap, entropy_weighted_ensemble, gap_summary, mean_ensemble,
                     regression_metrics)
from models import class_probabilities
from runs import finished, load_run
from safeio import ArgumentParser, UserError, check_number, run_cli, write_csv
from training import make_loader, predict, setup_device


def find_runs(paths):
    """Every finished run named by `paths` (a run folder, a best.pt in one, or a folder above runs), in order."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            if not finished(os.path.dirname(os.path.abspath(path))):
                raise UserError(f"{path}: not the checkpoint of a finished run (no metrics.json beside it)")
            found.append(path)
        elif finished(path):
            found.append(path)
        elif os.path.isdir(path):
            below = sorted(root for root, _, files in os.walk(path) if "metrics.json" in files)
            if not below:
                raise UserError(f"{path}: no finished run (a folder with best.pt and metrics.json) in or under it")
            found += below
        else:
            raise UserError(f"{path}: no such run folder")
    return [load_run(p) for p in found]


def check_members(members):
    """All members must answer the same question: one task, one set of classes."""
    first = members[0]
    for m in members[1:]:
        if m.run.task != first.run.task or m.class_names != first.class_names:
            what = (f"task {m.run.task} vs {first.run.task}" if m.run.task != first.run.task
                    else f"classes {m.class_names} vs {first.class_names}")
            raise UserError(f"cannot combine {first.dir} and {m.dir}: {what}")


def check_images(table, members):
    """Every image on the grid the members were trained on (shape and voxel size, read from the headers)."""
    wanted = {(tuple(m.inputs["image_shape"]), tuple(m.inputs.get("voxel_size") or ()), m.dir) for m in members
              if m.inputs.get("image_shape")}
    for path, subject in zip(table.image_paths, table.subjects):
        shape, voxel = data.image_geometry(path, subject)
        for train_shape, train_voxel, run_dir in wanted:
            if shape != train_shape or (train_voxel and not np.allclose(voxel, train_voxel, atol=1e-3)):
                raise UserError(f"{path} (subject {subject}): image {shape} at {voxel} mm, but {run_dir} was "
                                f"trained on {train_shape} at {train_voxel} mm; preprocess it the same way")


def member_outputs(members, table, cache_dir, batch_size, device, progress=True):
    """Each member's predictions for every subject of `table`: (K, N, C) probabilities or (K, N) ages.
    Images are decoded once per distinct crop (and once for brain age), then every member reads them."""
    task, n = members[0].run.task, len(table.subjects)
    caches, outputs, t0 = {}, [], time.time()
    for k, m in enumerate(members):
        images = None
        if m.run.model != "tabular":
            crops = m.crops
            key = (crops.cache_key() if crops is not None else "", m.run.cache_dtype)
            if key not in caches:
                caches[key] = data.ImageCache(table.image_paths, cache_dir, m.run.cache_dtype, transform=crops,
                                              names=table.subjects).prepare(progress=progress)
            images = caches[key]
        if task == "ad":
            tab = m.tabular.transform(table.raw)                                  # its own imputation (Sec. 3.3)
            targets = np.zeros(n, np.int64)
            ds = (data.ADDataset(images, tab, targets, train=False) if images is not None
                  else data.TabularDataset(tab, targets))
            out, _ = predict(m.model(device), make_loader(ds, batch_size, 0, device), device, class_probabilities)
        else:
            ds = data.BrainAgeDataset(images, data.sex_onehot(table.sex), np.zeros(n, np.float32))
            out, _ = predict(m.model(device), make_loader(ds, batch_size, 0, device), device, m.target.decode)
        outputs.append(out)
        if progress:
            left = (time.time() - t0) / (k + 1) * (len(members) - k - 1)
            print(f"member {k + 1}/{len(members)} {m.dir}: {n} subjects, {left:.0f} s left", flush=True)
    return np.stack(outputs)


def combine(task, outputs):
    """Eq. 7-8 for AD ((K, N, C) -> (N, C), spread = the largest std of a class probability across
    members), Eq. 6 for brain age ((K, N) -> (N,), spread = the std of the members' ages)."""
    if task == "ad":
        return entropy_weighted_ensemble(outputs), outputs.std(0).max(1)
    return mean_ensemble(outputs), outputs.std(0)


def ensemble_age_bias(members):
    """The age-bias correction of the Eq. 6 ensemble: the mean of the members' fits, each on its validation
    set (exact when they share one, as the versions of a brain-age protocol do); None if a member has none."""
    fits = [m.read_metrics().get("age_bias") for m in members]
    if any(f is None for f in fits):
        return None
    return {k: float(np.mean([f[k] for f in fits])) for k in ("intercept", "slope")}


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders, or folders above them")
    p.add_argument("--data-csv", required=True, help="the new subjects (no diagnosis or age needed)")
    p.add_argument("--image-dir", help="folder of <Subject>.nii.gz (default: <csv folder>/images)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache)")
    p.add_argument("--out", required=True, help="the predictions CSV to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    check_number("--batch-size", a.batch_size, least=1)
    if os.path.abspath(a.out) == os.path.abspath(a.data_csv):
        raise UserError(f"--out {a.out}: the predictions would overwrite the table --data-csv")
    t0 = time.time()
    members = find_runs(a.runs)
    check_members(members)
    task, first = members[0].run.task, members[0]
    need_images = any(m.run.model != "tabular" for m in members)
    if task == "ad":
        table = data.read_ad_table(a.data_csv, a.image_dir, need_images, len(first.class_names),
                                   first.run.group_map, for_prediction=True)
    else:
        table = data.read_brain_age_table(a.data_csv, a.image_dir, for_prediction=True)
    if need_images:
        check_images(table, members)
    device = setup_device(a.device)
    outputs = member_outputs(members, table, a.cache_dir or data.default_cache_dir(a.data_csv), a.batch_size,
                             device, progress=not a.quiet)
    combined, spread = combine(task, outputs)
    K, n = len(members), len(table.subjects)
    if task == "ad":
        names = first.class_names
        header = ["Subject"] + [f"prob_{c}" for c in names] + ["predicted", "n_models", "prob_spread"]
        rows = [[s] + [f"{q:.6f}" for q in pr] + [names[int(pr.argmax())], K, f"{sp:.6f}"]
                for s, pr, sp in zip(table.subjects, combined, spread)]
    else:
        bias = ensemble_age_bias(members)
        header = ["Subject", "predicted_age", "n_models", "age_spread"]
        gaps = []
        if np.isfinite(table.age).any():
            header.append("gap")
            gaps.append(combined - table.age)
            if bias is not None:
                header.append("corrected_gap")
                gaps.append(corrected_gap(table.age, combined, bias))
        cell = lambda v: f"{v:.3f}" if np.isfinite(v) else ""
        rows = [[s, f"{y:.3f}", K, f"{sp:.3f}"] + [cell(g[i]) for g in gaps]
                for i, (s, y, sp) in enumerate(zip(table.subjects, combined, spread))]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_csv(rows, header, a.out)
    seconds = time.time() - t0
    print(f"{n} subjects x {K} models ({task}, {', '.join(sorted({m.run.model for m in members}))}) -> {a.out}, "
          f"{seconds:.1f} s ({n / seconds:.1f} subjects/s)")
    if task == "ad" and (table.labels >= 0).any():
        known = table.labels >= 0
        m = classification_metrics(table.labels[known], combined[known], names)
        print(f"ensemble on the {int(known.sum())} subjects with a diagnosis: BA {m['balanced_accuracy']:.3f} "
              f"AUC {m['auc_macro']:.3f} F1 {m['f1_macro']:.3f} precision {m['precision']:.3f}")
    elif task == "brain-age" and np.isfinite(table.age).any():
        known = np.isfinite(table.age)
        m = regression_metrics(table.age[known], combined[known], table.sex[known])
        print(f"ensemble on the {int(known.sum())} subjects with an age: MAE {m['mae']:.2f} (male "
              f"{m['mae_male']:.2f}, female {m['mae_female']:.2f}) years")
        if bias is not None:
            g = gap_summary(table.age[known], combined[known], table.sex[known], bias)
            print(f"brain-age gap: mean {g['gap']:+.2f} (male {g['gap_male']:+.2f}, female {g['gap_female']:+.2f}), "
                  f"bias-corrected {g['corrected_gap']:+.2f} (male {g['corrected_gap_male']:+.2f}, female "
                  f"{g['corrected_gap_female']:+.2f}); r(gap, age) {g['r_gap_age']:+.2f} -> "
                  f"{g['r_corrected_gap_age']:+.2f}")
    return {"task": task, "subjects": table.subjects, "combined": combined, "spread": spread,
            "outputs": outputs, "members": [m.dir for m in members]}


if __name__ == "__main__":
    run_cli(main)
