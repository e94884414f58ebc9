"""Probabilities a clinician can weigh: the AD runs' calibration, measured and corrected by temperature scaling.

    python evaluate.py calibrate runs/                     # every finished AD run under runs/, then the report
    python evaluate.py calibrate runs/ad/hyperfusion --plots figures/

Temperature scaling (Guo et al. 2017): a run's logits z become softmax(z / T), one temperature T > 0 per run,
fitted on that run's own validation set by minimising the negative log-likelihood (NLL), a one-dimensional
problem solved by scipy's bounded scalar minimiser over log T. Dividing the logits by T keeps every subject's
argmax, so a run's balanced accuracy, confusion matrix and TP rates never change; its AUC (both sides averaged),
ECE, Brier score and NLL do. Both hippocampi: each side's logits are scaled, then the sides' probabilities
averaged (Sec. 4.3.6), as prediction does.

A run keeps logits.npz (its validation and test logits, both sides apart) and calibration.json: the temperature
and the validation and test calibration (metrics.calibration_metrics) before and after. train_ad.py writes both
when a run finishes; a run trained before is calibrated here, its logits predicted again from its own folder,
table and image cache (never retrained); --refit fits again from the kept logits.

The report (calibration_ad.md / .json in --out, default the first RUNS folder): on the test set, per run and per
Eq. 7-8 ensemble of a (model, split seed, version)'s four folds, ECE, class-wise ECE, Brier and NLL before and
after. The ensemble after is Eq. 7-8 of the members each at its own temperature: T also changes Eq. 8's weights
(a flatter member weighs less), so the calibrated ensemble is measured, not assumed. The paper's numbers
(Table 3, predict.py) stay uncalibrated unless --calibrated is asked for.
"""
import argparse
import math
import os

import numpy as np
import torch
from scipy.optimize import minimize_scalar

import data
from metrics import (CALIBRATION_COLUMNS, calibration_metrics, classification_metrics, entropy_weighted_ensemble, fmt,
                     markdown_table)
from models import AD_MODEL_TITLES, class_probabilities
from plots import Figures, check_plots_folder, file_part, reliability_figure
from predict import find_runs, test_set
from precision import replay_precision
from runs import CALIBRATION_FILE
from safeio import ArgumentParser, UserError, atomic_path, check_number, run_cli, write_json, write_text
from training import make_loader, predict, setup_device

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


def predict_logits(finished_run, device, batch_size=16):
    """A finished AD run's validation and test logits predicted again, as its training script read them."""
    outputs = {}
    for part in ("val", "test"):
        run, table, idx, images = test_set(finished_run, part=part)
        tab = finished_run.tabular.transform([table.raw[i] for i in idx])
        ds = (data.ADDataset(images, tab, table.labels[idx], train=False) if images is not None
              else data.TabularDataset(tab, table.labels[idx]))
        outputs[part] = predict(finished_run.model(device), make_loader(ds, batch_size, 0, device), device, None,
                                replay_precision(run.precision, device), sides=True)
    return outputs


# ----------------------------------------------------------------------------------------------
# The report: every run, and every four-fold ensemble, before and after

def calibrate_runs(paths, refit=False, device="auto", batch_size=16, quiet=False):
    """Every finished AD run under `paths` calibrated (kept calibration.json reused unless refit) ->
    [(FinishedRun, its calibration record, its outputs)]."""
    dev, found = None, []
    for finished_run in find_runs(paths):
        if finished_run.run.task != "ad":
            continue
        outputs = read_logits(finished_run.dir)
        if outputs is None:
            dev = dev or setup_device(device)
            outputs = predict_logits(finished_run, dev, batch_size)
            save_logits(finished_run.dir, outputs["val"], outputs["test"])
        kept = finished_run.temperature is not None and not refit
        record = finished_run.read_json(CALIBRATION_FILE) if kept else calibrate(finished_run.dir, outputs)
        if not quiet:
            print(f"{finished_run.dir}: T {record['temperature']:.3f}, validation ECE "
                  f"{record['val']['before']['ece']:.3f} -> {record['val']['after']['ece']:.3f}"
                  + (" (kept)" if kept else ""))
        found.append((finished_run, record, outputs))
    if not found:
        raise UserError(f"{', '.join(map(str, paths))}: no finished AD run in or under it")
    return found


def ensembles(calibrated):
    """The four-fold groups among the calibrated runs -> {(model, seed, version): [(run, record, outputs)] x 4}."""
    groups = {}
    for item in calibrated:
        r = item[0].run
        groups.setdefault((r.model, r.split_seed, r.version, r.classes), []).append(item)
    return {key[:3]: sorted(g, key=lambda item: item[0].run.fold) for key, g in sorted(groups.items())
            if sorted(item[0].run.fold for item in g) == [0, 1, 2, 3]}


def ensemble_probs(members, calibrated):
    """Eq. 7-8 over the members' test probabilities, each at its temperature when `calibrated`."""
    labels = members[0][2]["test"][1]
    for finished_run, _, outputs in members[1:]:
        if not np.array_equal(outputs["test"][1], labels):
            raise UserError(f"cannot ensemble {members[0][0].dir} and {finished_run.dir}: their test labels differ")
    return entropy_weighted_ensemble(np.stack([probabilities(o["test"][0], rec["temperature"] if calibrated else 1.0)
                                               for _, rec, o in members])), labels


def report(calibrated, plots_dir=None, quiet=False):
    """The test-set calibration of every run and every four-fold ensemble, before -> after. -> (markdown, dict)."""
    rows, out = [], {"runs": [], "ensembles": []}
    for finished_run, rec, _ in calibrated:
        r = finished_run.run
        shift = [f"{fmt(rec['test']['before'][k])} → {fmt(rec['test']['after'][k])}" for _, k in CALIBRATION_COLUMNS]
        fitted = f"{fmt(rec['val']['before']['ece'])} → {fmt(rec['val']['after']['ece'])}"
        rows.append([r.model, r.split_seed, r.version, r.fold, f"{rec['temperature']:.3f}", fitted] + shift)
        out["runs"].append({"dir": finished_run.dir, **rec})
    header = ["model", "seed", "version", "fold", "T", "ECE val"] + [f"{n} test" for n, _ in CALIBRATION_COLUMNS]
    md = ["# Calibration of the AD runs (temperature scaling, Guo et al. 2017)", "",
          f"Before → after; T fitted per run on its validation set (ECE val: where it was fitted), then the test "
          f"set ({len(calibrated)} runs).", "",
          markdown_table(header, rows)]
    groups, figs = ensembles(calibrated), None
    if plots_dir and groups:
        figs = Figures(plots_dir, quiet)
    rows = []
    for (model, seed, version), members in groups.items():
        (before, labels), (after, _) = ensemble_probs(members, False), ensemble_probs(members, True)
        m0 = classification_metrics(labels, before, members[0][0].class_names)
        m1 = classification_metrics(labels, after, members[0][0].class_names)
        keys = ["balanced_accuracy", "auc_macro"] + [k for _, k in CALIBRATION_COLUMNS]
        rows.append([model, seed, version] + [f"{fmt(m0[k])} → {fmt(m1[k])}" for k in keys])
        out["ensembles"].append({"model": model, "split_seed": seed, "version": version,
                                 "members": [m[0].dir for m in members], "before": m0, "after": m1})
        if figs is not None:
            members_after = [(f"fold {m[0].run.fold}", labels, probabilities(m[2]["test"][0], m[1]["temperature"]))
                             for m in members]
            reliability_figure(figs, f"reliability_calibrated_{file_part(model)}_seed{seed}_v{version}.png",
                               [("ensemble, uncalibrated", labels, before), ("ensemble, calibrated", labels, after)]
                               + members_after,
                               f"{AD_MODEL_TITLES.get(model, model)}, split seed {seed}, v{version}: test set")
    if rows:
        md += ["", "Eq. 7-8 ensembles of the four folds, test set, before → after (after: every member at its own "
               "temperature, which changes Eq. 8's weights, so BA may move):", "",
               markdown_table(["model", "seed", "version", "BA", "AUC"] + [n for n, _ in CALIBRATION_COLUMNS], rows)]
    if figs is not None:
        out["plots"] = figs.summary()
    return "\n".join(md) + "\n", out


def main(argv=None):
    p = ArgumentParser(prog="evaluate.py calibrate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUNS", help="finished AD run folders, or folders above them")
    p.add_argument("--out", help="folder of calibration_ad.md / .json (default: the first RUNS folder)")
    p.add_argument("--plots", metavar="DIR", help="reliability diagrams of every ensemble, before and after")
    p.add_argument("--refit", action="store_true", help="fit every temperature again from the kept logits")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    check_number("--batch-size", a.batch_size, least=1)
    if a.plots:                       # before any work: without matplotlib nothing is computed
        check_plots_folder(a.plots)
    calibrated = calibrate_runs(a.runs, a.refit, a.device, a.batch_size, a.quiet)
    md, res = report(calibrated, a.plots, a.quiet)
    out_dir = a.out or (a.runs[0] if os.path.isdir(a.runs[0]) else os.path.dirname(a.runs[0]))
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"calibration_ad.{ext}") for ext in ("md", "json")]
    write_text(md, paths[0])
    write_json(res, paths[1])
    if not a.quiet:
        print(md)
        print("wrote " + ", ".join(paths))
    return res


if __name__ == "__main__":
    run_cli(main)
