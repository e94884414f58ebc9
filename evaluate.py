"""The paper's evaluation: Table 3, the brain-age ensembles, layer selection, test-time sweeps.

Finished runs are read back with runs.load_run and combined with the ensembles of metrics.py
(Eq. 6-8, Sec. 3.4, 4.2.2, 4.3.6-4.3.7). protocol.py trains the runs they read (`evaluate.py run-protocol`
runs it too).

    python evaluate.py ad --runs runs/                    # Table 3: one row per (split seed, version)
    python evaluate.py ad --runs runs/ --binary           # App. B: CN vs AD, from runs/ad-binary/
    python evaluate.py brain-age --runs runs/             # Fig. 4: ensemble of the 5 best versions
    python evaluate.py select-layers --task ad            # Sec. 3.1.2: loss entropy of every layer
    python evaluate.py sweep runs/ad/hyperfusion/seed0/v0/fold0 --attribute ABETA --values 500 1500
    python evaluate.py sweep runs/brain-age/hyperfusion/v0/best.pt --attribute Sex --values M F
    python evaluate.py calibrate runs/                    # temperature scaling of every AD run (calibration.py)

`ad` ensembles the four fold models of every (model, split seed, version) on their shared test
set with Eq. 7-8 and writes results_ad.{md,csv,json} next to the runs; `brain-age` averages
(Eq. 6) the 5 versions with the lowest validation MAE and writes results_brain-age.{md,csv,json}.
`sweep` re-reads the same test scans with one tabular attribute set to each value in turn: the
model is adjusted at test time (Sec. 1), which only a conditioned model can show.
`--plots DIR` (ad, brain-age, sweep) also draws the figures as PNG files (plots.py; needs matplotlib).
`ad` also reports the calibration of the ensembles' probabilities (ECE, class-wise ECE, Brier, NLL) after the
paper's columns; `calibrate` fits and reports temperature scaling (calibration.py).
Bad input (mismatched runs, missing files) -> one line `error: ...` on stderr, exit status 2.
"""
import csv
import os
import re
import struct
import sys
import zlib
import numpy as np
import argparse
import math
import torch
import data
import json
import time
import torch.nn.functional as F
import predict
import training
import subprocess
import tempfile
import shlex
import train_ad
import train_brain_age
from sklearn.metrics import roc_auc_score, roc_curve
from metrics import (CALIBRATION_BINS, age_bias_fit, corrected_gap, expected_calibration_error, fmt, reliability,
    CALIBRATION_COLUMNS, calibration_metrics, classification_metrics, entropy_weighted_ensemble, markdown_table,
    fmt_p, gap_summary, mann_whitney_p, mean_ensemble, mean_std, regression_metrics)
from data import (matplotlib_or_none, png_bytes, write_png, UserError, atomic_path, write_bytes, ArgumentParser, check_number, run_cli, write_json, write_text,
    check_output, duration_text, write_csv, TabularPreprocessor, Progress, warn)
from scipy.optimize import minimize_scalar
from models import (AD_MODEL_TITLES, class_probabilities, AgeTarget, build_model, candidate_layers,
    layer_loss_entropy, AD_MODELS, BRAIN_AGE_MODELS)
from predict import find_runs, test_set
from training import (LOGITS_FILE, T_BOUNDS, probabilities, nll, fit_temperature, save_logits, read_logits, calibrate, replay_precision, CALIBRATION_FILE, make_loader, setup_device, finished, load_run,
    ad_run_dir, brain_age_run_dir)
from synthetic import builtin_cohort
from dataclasses import dataclass


# ---- plots -------------------------------------------------------------------------------------
# The figures as PNG files: Table 3 and Fig. 4 drawn, confusion matrices, ROC and learning curves, sweeps; and the
# one way this project writes a PNG (matplotlib when installed, else a standard-library encoder for the previews).
#
#     evaluate.py ad --plots DIR         confusion_<model>_seed<S>_v<V>.png, roc_<...>.png, reliability_<...>.png
#                                        per row of Table 3, table3.png (its columns as bars per model: mean +- std,
#                                        the rows as points), learning_curves_<model>.png (--binary: names end _binary)
#     evaluate.py brain-age --plots DIR  brain_age_scatter_<folder>.png per ensemble, fig4a.png, fig4b.png,
#                                        brain_age_gap_by_sex.png, learning_curves_<folder>.png
#     evaluate.py sweep ... --plots DIR  sweep_<model>_<attribute>.png
#     evaluate.py calibrate --plots DIR  reliability_calibrated_<model>_seed<S>_v<V>.png (before and after)
#     data.py check-ad ... --preview DIR the previews, through write_png
#
# matplotlib is optional (requirements.txt does not list it): it is imported inside the functions that draw, never
# at the top, so that importing this module, and the previews, work without it. Without it `--plots` is refused
# before any other work (check_plots_folder), in one line. Every file is written atomically (safeio.atomic_path).
# A figure whose runs are absent is not drawn: one line says which and why.

DPI = 100
SMALL = (5, 4)        # inches: one panel, 500 x 400 pixels at DPI
WIDE = (9, 4)         # two panels side by side, 900 x 400 pixels
NEED_MATPLOTLIB = "--plots needs matplotlib: pip install matplotlib"
SEX_COLOURS = {0: ("male", "tab:blue"), 1: ("female", "tab:pink")}
FIG4A_BARS = (("M", "trained on males", "tab:blue"), ("F", "trained on females", "tab:pink"),
              ("mixed", "trained on a mix", "tab:green"))                    # Sec. 4.2.4: blue, pink, green
FIG4B_BARS = (("imaging", "image only", "tab:orange"), ("concat", "concatenation", "lightblue"),
              ("hyperfusion", "HyperFusion (sex -> 1 scalar)", "purple"),
              ("hyperfusion-emb2", "HyperFusion (sex -> 2D)", "olive"))        # Sec. 4.2.5's colours
FIG4B_NEEDS = ("imaging", "hyperfusion")     # the comparison Fig. 4B makes; concatenation and 2D drawn when present
TEST_SETS = (("mae_male", "male"), ("mae_female", "female"), ("mae", "all"))
AD_COLOURS = {"imaging": "tab:orange", "tabular": "tab:gray", "late-fusion": "tab:brown", "concat": "lightblue",
              "film": "tab:green", "daft": "tab:cyan", "hyperfusion": "purple"}   # one colour a model, as Fig. 4B


# ----------------------------------------------------------------------------------------------
# matplotlib, optional

def pyplot():
    """matplotlib.pyplot on Agg; a UserError (one line, exit status 2 under run_cli) when matplotlib is absent."""
    if matplotlib_or_none() is None:
        raise UserError(NEED_MATPLOTLIB)
    import matplotlib.pyplot as plt          # deferred for the same reason as in matplotlib_or_none
    return plt


def check_plots_folder(folder):
    """At the start of a command with --plots DIR, before anything is computed or written: matplotlib is
    installed and DIR can be a folder. Else a UserError, so that nothing is half-written."""
    pyplot()
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--plots {folder}: is a file; give a folder for the PNG files")


# ----------------------------------------------------------------------------------------------
# PNG files: the previews' images (pixel for pixel) and the figures

def file_part(name):
    """A model or folder name as part of a file name: anything but letters, digits, . _ - becomes _."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip(".") or "_"


class Figures:
    """Where one command's figures go: save() writes each atomically and says so in one line (unless quiet),
    skip() says which figure is not drawn and why. written / skipped: what happened, for the caller."""

    def __init__(self, folder, quiet=False):
        self.plt, self.folder, self.quiet = pyplot(), folder, quiet
        self.written, self.skipped = [], {}
        os.makedirs(folder, exist_ok=True)

    def new(self, size=SMALL, panels=1):
        fig, axes = self.plt.subplots(1, panels, figsize=size, dpi=DPI)
        return fig, axes

    def save(self, fig, name):
        path = os.path.join(self.folder, name)
        try:
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=DPI)        # no bbox_inches="tight": the size stays size x DPI
        finally:
            self.plt.close(fig)
        self.written.append(path)
        if not self.quiet:
            print(f"wrote {path}")
        return path

    def skip(self, name, why):
        self.skipped[name] = why
        if not self.quiet:
            print(f"skipped {name}: {why}")

    def summary(self):
        return {"written": self.written, "skipped": self.skipped}


def bar_labels(ax, bars, values):
    for b, v in zip(bars, values):
        if np.isfinite(v):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=6)


# ----------------------------------------------------------------------------------------------
# Learning curves: log.csv of each run (training.fit: epoch, train_loss, the validation score, ...)

def read_log(run_dir):
    """-> (epochs, train loss, validation score, the score's name) from run_dir/log.csv, or None without one."""
    path = os.path.join(run_dir, "log.csv")
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    score = next((k for k in ("balanced_accuracy", "mae") if k in rows[0]), None)   # train_ad / train_brain_age
    if score is None or "train_loss" not in rows[0]:
        return None
    col = lambda k: np.array([float(r[k]) for r in rows])
    return col("epoch"), col("train_loss"), col(score), score


def learning_curves(figs, name, run_dirs, label=None):
    """learning_curves_<name>.png: the training loss and the validation score per epoch of every run, overlaid."""
    file = f"learning_curves_{file_part(name)}.png"
    logs = [(d, read_log(d)) for d in run_dirs]
    logs = [(d, lg) for d, lg in logs if lg is not None]
    if not logs:
        figs.skip(file, f"no log.csv in the {len(run_dirs)} runs of {name}" if run_dirs else f"{name} has no runs "
                  f"of its own")
        return
    fig, (left, right) = figs.new(WIDE, 2)
    alpha = 0.35 if len(logs) > 3 else 0.7
    for _, (epoch, loss, score, _) in logs:
        left.plot(epoch, loss, color="tab:blue", alpha=alpha, lw=1)
        right.plot(epoch, score, color="tab:red", alpha=alpha, lw=1)
    score_name = logs[0][1][3]
    left.set(xlabel="epoch", ylabel="training loss", title=f"{label or name}: {len(logs)} runs")
    if all((lg[1] > 0).all() for _, lg in logs):
        left.set_yscale("log")
    right.set(xlabel="epoch", ylabel={"balanced_accuracy": "validation balanced accuracy",
                                      "mae": "validation MAE (years)"}[score_name], title="validation")
    figs.save(fig, file)


# ----------------------------------------------------------------------------------------------
# AD: Table 3's rows (Sec. 4.3.6-4.3.7)

def confusion_figure(figs, file, cm, class_names, title):
    """Two panels: the counts, and each row divided by its true class's count."""
    cm = np.asarray(cm, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(1, keepdims=True)
    fig, axes = figs.new(WIDE, 2)
    for ax, values, what in ((axes[0], cm, "counts"), (axes[1], norm, "row-normalised")):
        ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0, vmax=1 if values is norm else max(cm.max(), 1))
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                v = values[i, j]
                text = f"{int(v)}" if values is cm else ("-" if not np.isfinite(v) else f"{v:.2f}")
                dark = (v / max(cm.max(), 1) if values is cm else np.nan_to_num(v)) > 0.5
                ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=9)
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xticklabels=class_names,
               yticklabels=class_names, xlabel="predicted", ylabel="true", title=what)
    fig.suptitle(title, fontsize=10)
    figs.save(fig, file)


def roc_figure(figs, file, labels, probs, class_names, title):
    """One-vs-rest ROC curve of every class, its AUC in the legend."""
    labels, probs = np.asarray(labels), np.asarray(probs, float)
    fig, ax = figs.new(SMALL)
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} vs rest: no {'negatives' if positive.all() else 'positives'}")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest: AUC {fmt(roc_auc_score(positive, probs[:, c]))}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    figs.save(fig, file)


def reliability_figure(figs, file, curves, title):
    """Top-label reliability diagram (metrics.reliability): per curve (name, labels, probs), the accuracy of the
    subjects in each of 15 equal-width confidence bins against their mean confidence, the diagonal being
    calibrated, ECE in the legend; right, how many subjects each bin holds (a point of few subjects says little)."""
    fig, (ax, counts_ax) = figs.new(WIDE, 2)
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    for k, (name, labels, probs) in enumerate(curves):
        labels, probs = np.asarray(labels), np.asarray(probs, float)
        hit, confidence = probs.argmax(1) == labels, probs.max(1)
        observed, predicted, counts = reliability(hit, confidence)
        style = dict(lw=2.0, marker="o", ms=4) if k < 2 and "ensemble" in name else dict(lw=0.8, alpha=0.6)
        line, = ax.plot(predicted, observed, label=f"{name}: ECE {fmt(expected_calibration_error(hit, confidence))}",
                        **style)
        full = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=CALIBRATION_BINS)
        counts_ax.step(edges[:-1], full, where="post", color=line.get_color(), lw=style["lw"], label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (largest probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=7)
    counts_ax.set(xlim=(0, 1), xlabel="confidence bin (15 of width 1/15)", ylabel="subjects",
                  title="subjects per bin")
    figs.save(fig, file)


def table3_figure(figs, file, res):
    """Every column of Table 3 the paper has as grouped bars, one bar per model: the mean over its rows, the sample
    std as an error bar and the rows as points when it has several."""
    cols, models = res["paper_columns"], res["models"]
    fig, ax = figs.new(WIDE)
    width = 0.8 / len(models)
    colours = figs.plt.get_cmap("tab10")
    x = np.arange(len(cols))
    for k, m in enumerate(models):
        pos = x - 0.4 + width * (k + 0.5)
        mean = np.array([m["mean"][t] for t in cols], float)
        std = np.array([m["std"][t] for t in cols], float) if m["n_rows"] > 1 else None
        label = f"{m['title']} ({m['n_rows']} row{'s' * (m['n_rows'] != 1)})"
        ax.bar(pos, np.nan_to_num(mean), width, yerr=None if std is None else np.nan_to_num(std), capsize=1.5,
               color=AD_COLOURS.get(m["model"], colours(k % 10)), label=label, error_kw={"lw": 0.8})
        if m["n_rows"] > 1:
            for j, t in enumerate(cols):
                ax.scatter(np.full(m["n_rows"], pos[j]), [r[t] for r in m["rows"]], s=3, color="black", zorder=3)
    title = "Binary CN vs AD (App. B)" if res["task"] == "ad-binary" else "AD classification (Table 3)"
    ax.set(xticks=x, xticklabels=cols, ylim=(0, 1.05), ylabel="test set, ensemble of 4 folds per row",
           title=title + ": mean ± std over rows")
    ax.legend(fontsize=6, ncol=min(4, len(models)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    figs.save(fig, file)


def ad_figures(res, ensembles, folder, quiet=False):
    """evaluate.py ad --plots: per row (model, split seed, version) its confusion matrix, ROC curves and reliability
    diagram (the ensemble beside its four fold members); Table 3
    as bars; a learning-curve figure per model. res: ad_results; ensembles: {model: {(seed, version):
    its ensemble (labels, probs, dirs)}} as ad_results kept them. -> {"written", "skipped"}."""
    figs = Figures(folder, quiet)
    tag = "_binary" if res["task"] == "ad-binary" else ""
    names = res["class_names"]
    for m in res["models"]:
        for r in m["rows"]:
            e = ensembles[m["model"]][(r["split_seed"], r["version"])]
            stem = f"{file_part(m['model'])}_seed{r['split_seed']}_v{r['version']}{tag}"
            what = f"{m['title']}, split seed {r['split_seed']}, v{r['version']}"
            confusion_figure(figs, f"confusion_{stem}.png", r["metrics"]["confusion_matrix"], names,
                             f"{what}: BA {fmt(r['BA'])}")
            roc_figure(figs, f"roc_{stem}.png", e["labels"], e["probs"], names, f"{what}\nmacro AUC {fmt(r['AUC'])}")
            members = [(f"fold {k}", e["labels"], p) for k, p in enumerate(e.get("members", []))]
            reliability_figure(figs, f"reliability_{stem}.png", [("ensemble", e["labels"], e["probs"])] + members,
                               f"{what}: test set")
    table3_figure(figs, f"table3{tag}.png", res)
    for m in res["models"]:
        dirs = [d for e in ensembles[m["model"]].values() for d in e.get("dirs", [])]
        learning_curves(figs, m["model"] + tag, dirs, m["title"])
    return figs.summary()


# ----------------------------------------------------------------------------------------------
# Brain age (Sec. 4.2, Fig. 4)

def scatter_figure(figs, file, e, title):
    """Predicted against chronological age, coloured by sex, with the identity line. With validation predictions
    (e["fit"], metrics.age_bias_fit of the ensemble on the validation set): left, the predictions and the age
    bias fitted there, which the correction subtracts; right, the corrected predictions (age + corrected_gap)
    and their own least-squares line on these test scans."""
    age, pred, sex, fit = np.asarray(e["age"], float), np.asarray(e["pred"], float), np.asarray(e["sex"]), e["fit"]
    fig, axes = figs.new(WIDE if fit else SMALL, 2 if fit else 1)
    axes = list(axes) if fit else [axes]
    panels = [(axes[0], pred, "as predicted")]
    if fit:
        panels.append((axes[1], age + corrected_gap(age, pred, fit), "age bias corrected"))
    lo, hi = float(min(age.min(), pred.min())), float(max(age.max(), pred.max()))
    if fit:
        lo, hi = min(lo, float(panels[1][1].min())), max(hi, float(panels[1][1].max()))
    line = np.array([lo, hi])
    for k, (ax, y, what) in enumerate(panels):
        for code, (name, colour) in SEX_COLOURS.items():
            ax.scatter(age[sex == code], y[sex == code], s=6, alpha=0.6, color=colour, label=name)
        ax.plot(line, line, color="black", lw=0.8, label="identity")
        if fit and k == 0:
            ax.plot(line, line + fit["intercept"] + fit["slope"] * line, color="tab:red", ls="--", lw=1.2,
                    label=f"age bias (validation fit, n {fit['n']}): slope {fit['slope']:+.2f}")
        elif fit:
            after = age_bias_fit(age, y)                 # a description of what is left, not a second correction
            ax.plot(line, line + after["intercept"] + after["slope"] * line, color="tab:green", ls="--", lw=1.2,
                    label=f"least squares on the test scans: slope {after['slope']:+.2f}")
        r = e.get("gap") and e["gap"]["r_corrected_gap_age" if k else "r_gap_age"]
        ax.set(xlabel="chronological age (years)", ylabel="predicted age (years)", xlim=(lo, hi), ylim=(lo, hi),
               title=what + ("" if r is None else f": r(gap, age) {r:+.2f}"))
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{title}: test MAE {e['metrics']['mae']:.2f} years", fontsize=10)
    figs.save(fig, file)


def mae_bars(figs, file, bars, title, note=""):
    """Grouped bars as Fig. 4 draws them: groups male / female / all test scans, one bar per (label, colour,
    metrics) in bars."""
    fig, ax = figs.new(SMALL)
    width = 0.8 / len(bars)
    x = np.arange(len(TEST_SETS))
    top = 0.0
    for k, (label, colour, met) in enumerate(bars):
        values = [met[key] for key, _ in TEST_SETS]
        bar_labels(ax, ax.bar(x - 0.4 + width * (k + 0.5), values, width, color=colour, label=label), values)
        top = max([top] + [v for v in values if np.isfinite(v)])
    ax.set(xticks=x, xticklabels=[f"test: {t}" for _, t in TEST_SETS], ylabel="MAE (years)", title=title,
           ylim=(0, 1.35 * top or 1))
    ax.legend(fontsize=7, loc="upper center", ncol=2)                 # in the headroom above the bars
    if note:
        ax.set_xlabel(note, fontsize=7)
    figs.save(fig, file)


def fig4a(figs, res, by_folder):
    """Fig. 4A: per base model, the ensembles trained on males, females and the sex-balanced mix (one size),
    each tested on male, female and all scans; drawn only where all three training sets are there."""
    bases = sorted({r["model"] for r in res["fig4a"]})
    if not bases:
        figs.skip("fig4a.png", "no runs trained on one sex (<model>-trainM, -trainF, -trainmixed: run-protocol "
                  "--task brain-age --train-sex M F mixed)")
        return
    for base in bases:
        file = "fig4a.png" if len(bases) == 1 else f"fig4a_{file_part(base)}.png"
        have = {r["train"]: by_folder[r["folder"]] for r in res["fig4a"] if r["model"] == base}
        missing = [f"{base}-train{s}" for s, _, _ in FIG4A_BARS if s not in have]
        if missing:
            figs.skip(file, f"Fig. 4A compares three training sets: no finished runs in {', '.join(missing)}")
            continue
        mae_bars(figs, file, [(label, colour, have[s]["metrics"]) for s, label, colour in FIG4A_BARS],
                 f"Fig. 4A: {base}, equal-size training sets")


def fig4b(figs, by_folder):
    """Fig. 4B: image only, concatenation and HyperFusion (sex embedded to 1 and to 2 values), trained on every
    subject, tested on male, female and all scans; drawn when image-only and HyperFusion runs are there."""
    missing = [f for f in FIG4B_NEEDS if f not in by_folder]
    if missing:
        figs.skip("fig4b.png", f"Fig. 4B compares image-only and HyperFusion: no finished runs in "
                  f"{', '.join(missing)}")
        return
    absent = [label for f, label, _ in FIG4B_BARS if f not in by_folder]
    mae_bars(figs, "fig4b.png", [(label, colour, by_folder[f]["metrics"]) for f, label, colour in FIG4B_BARS
                                 if f in by_folder], "Fig. 4B: trained on every subject",
             f"not trained: {', '.join(absent)}" if absent else "")


def gap_figure(figs, res):
    """brain_age_gap_by_sex.png: the mean brain-age gap of males and females, before and after the age-bias
    correction, per ensemble that has validation predictions (the numbers of results_brain-age's gap table)."""
    models = [m for m in res["models"] if m["gap"]]
    if not models:
        figs.skip("brain_age_gap_by_sex.png", "no ensemble has validation predictions (val_pred in "
                  "predictions.npz) to fit the age bias on")
        return
    fig, ax = figs.new(WIDE if len(models) > 3 else SMALL)
    series = (("gap_male", "male", "tab:blue", None), ("gap_female", "female", "tab:pink", None),
              ("corrected_gap_male", "male, corrected", "tab:blue", "//"),
              ("corrected_gap_female", "female, corrected", "tab:pink", "//"))
    x, width = np.arange(len(models)), 0.8 / len(series)
    for k, (key, label, colour, hatch) in enumerate(series):
        values = [m["gap"][key] for m in models]
        bars = ax.bar(x - 0.4 + width * (k + 0.5), values, width, color=colour, hatch=hatch, label=label,
                      alpha=0.6 if hatch else 1.0, edgecolor="black" if hatch else None, lw=0.3)
        bar_labels(ax, bars, values)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xticks=x, ylabel="mean gap: predicted - chronological (years)", title="Brain-age gap by sex (test set)")
    ax.set_xticklabels([m["folder"] for m in models], rotation=20, fontsize=7)
    ax.legend(fontsize=6)
    figs.save(fig, "brain_age_gap_by_sex.png")


def brain_age_figures(res, ensembles, folder, quiet=False):
    """evaluate.py brain-age --plots: a scatter per ensemble, Fig. 4A, Fig. 4B, the gap by sex, a learning-curve
    figure per folder. res: brain_age_results; ensembles: {folder: its Eq. 6 ensemble (age, pred, sex,
    fit, dirs)} as brain_age_results kept them. -> {"written", "skipped"}."""
    figs = Figures(folder, quiet)
    for m in res["models"]:
        scatter_figure(figs, f"brain_age_scatter_{file_part(m['folder'])}.png", ensembles[m["folder"]],
                       f"{m['folder']} (Eq. 6 of v{', v'.join(map(str, m['versions']))})")
    by_folder = {m["folder"]: m for m in res["models"]}
    fig4a(figs, res, by_folder)
    fig4b(figs, by_folder)
    gap_figure(figs, res)
    for m in res["models"]:
        learning_curves(figs, m["folder"], ensembles[m["folder"]].get("dirs", []))
    return figs.summary()


# ----------------------------------------------------------------------------------------------
# The test-time sweep (predict.sweep, Sec. 1)

def sweep_figure(res, folder, quiet=False):
    """sweep_<model>_<attribute>.png: AD, the mean probability of each class (solid) and the fraction predicted
    as it (dashed) against the attribute's values; brain age, the mean predicted age of all, of the true males
    and of the true females. The first point is the test set as recorded. -> {"written", "skipped"}."""
    figs = Figures(folder, quiet)
    rows = res["summary"]
    ticks = ["as recorded" if s["value"] is None else str(s["value"]) for s in rows]
    x = np.arange(len(rows))
    fig, ax = figs.new(SMALL)
    if res["task"] == "ad":
        names = [h[len("mean P("):-1] for h in res["header"] if h.startswith("mean P(")]
        colours = figs.plt.get_cmap("tab10")
        for c, name in enumerate(names):
            ax.plot(x, [s["mean_probs"][c] for s in rows], marker="o", color=colours(c), label=f"mean P({name})")
            ax.plot(x, [s["predicted_fraction"][c] for s in rows], marker=".", ls="--", color=colours(c), lw=0.8,
                    label=f"predicted {name}")
        ax.set(ylim=(0, 1), ylabel="test set")
    else:
        for key, label, colour in (("mean_pred", "all scans", "black"), ("mean_pred_male", "true males", "tab:blue"),
                                   ("mean_pred_female", "true females", "tab:pink")):
            ax.plot(x, [s[key] for s in rows], marker="o", color=colour, label=label)
        ax.set(ylabel="mean predicted age (years)")
    ax.axvline(0.5, color="grey", lw=0.5, ls=":")
    ax.set(xticks=x, xlabel=f"{res['attribute']} given to every test subject", title=f"{res['model']}: test-time "
           f"sweep of {res['attribute']}")
    ax.set_xticklabels(ticks, fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    figs.save(fig, f"sweep_{file_part(res['model'])}_{file_part(res['attribute'])}.png")
    return figs.summary()


# ---- calibration -------------------------------------------------------------------------------
# Probabilities a clinician can weigh: the AD runs' calibration, measured and corrected by temperature scaling.
#
#     python evaluate.py calibrate runs/                     # every finished AD run under runs/, then the report
#     python evaluate.py calibrate runs/ad/hyperfusion --plots figures/
#
# Temperature scaling (Guo et al. 2017): a run's logits z become softmax(z / T), one temperature T > 0 per run,
# fitted on that run's own validation set by minimising the negative log-likelihood (NLL), a one-dimensional
# problem solved by scipy's bounded scalar minimiser over log T. Dividing the logits by T keeps every subject's
# argmax, so a run's balanced accuracy, confusion matrix and TP rates never change; its AUC (both sides averaged),
# ECE, Brier score and NLL do. Both hippocampi: each side's logits are scaled, then the sides' probabilities
# averaged (Sec. 4.3.6), as prediction does.
#
# A run keeps logits.npz (its validation and test logits, both sides apart) and calibration.json: the temperature
# and the validation and test calibration (metrics.calibration_metrics) before and after. train_ad.py writes both
# when a run finishes; a run trained before is calibrated here, its logits predicted again from its own folder,
# table and image cache (never retrained); --refit fits again from the kept logits.
#
# The report (calibration_ad.md / .json in --out, default the first RUNS folder): on the test set, per run and per
# Eq. 7-8 ensemble of a (model, split seed, version)'s four folds, ECE, class-wise ECE, Brier and NLL before and
# after. The ensemble after is Eq. 7-8 of the members each at its own temperature: T also changes Eq. 8's weights
# (a flatter member weighs less), so the calibrated ensemble is measured, not assumed. The paper's numbers
# (Table 3, predict.py) stay uncalibrated unless --calibrated is asked for.

def predict_logits(finished_run, device, batch_size=16):
    """A finished AD run's validation and test logits predicted again, as its training script read them."""
    outputs = {}
    for part in ("val", "test"):
        run, table, idx, images = test_set(finished_run, part=part)
        tab = finished_run.tabular.transform([table.raw[i] for i in idx])
        ds = (data.ADDataset(images, tab, table.labels[idx], train=False) if images is not None
              else data.TabularDataset(tab, table.labels[idx]))
        outputs[part] = training.predict(finished_run.model(device), make_loader(ds, batch_size, 0, device), device, None,
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


def calibrate_main(argv=None):
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



HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Reading finished runs

AD_ORDER = ("imaging", "tabular", "late-fusion", "concat", "film", "daft", "hyperfusion")  # Table 3's order
ENSEMBLE_KEYS = ("split_seed", "tabular_columns", "classes")        # the four folds of one ensemble share these
BRAIN_AGE_KEYS = ("model", "split_seed", "split", "embedding_dim", "train_sex")
N_FOLDS = 4


def read_run(run_dir):
    """One finished run -> {"dir", "config", "metrics", "pred"}: its run options and data facts, metrics.json
    and the test predictions in predictions.npz."""
    r = load_run(run_dir)
    return {"dir": run_dir, "config": r.config, "metrics": r.read_metrics(), "pred": r.read_predictions()}


def check_compatible(runs, keys):
    """Refuse to ensemble runs whose configs differ on `keys` or whose test subjects differ."""
    first = runs[0]
    for other in runs[1:]:
        for k in keys:
            a, b = first["config"].get(k), other["config"].get(k)
            if a != b:
                raise UserError(f"cannot ensemble {first['dir']} and {other['dir']}: {k} differs ({a!r} vs {b!r})")
        if not np.array_equal(first["pred"]["subjects"], other["pred"]["subjects"]):
            raise UserError(f"cannot ensemble {first['dir']} and {other['dir']}: their test subjects differ")


DATA_HASHES = {"table_sha256": "tables", "images_sha256": "images"}   # stored in every checkpoint's `inputs`


def check_same_data(runs, why="cannot combine {a} and {b}"):
    """Refuse runs trained on different data: their checkpoints' table sha256 or images' fingerprint differ (the
    table was edited, or images replaced, between their trainings). runs: dicts with "dir" and "config"; a run
    without a hash (a tabular-only run has no images) is not compared on it."""
    for key, what in DATA_HASHES.items():
        held = [r for r in runs if r["config"].get(key)]
        for other in held[1:]:
            a, b = held[0]["config"][key], other["config"][key]
            if a != b:
                raise UserError(why.format(a=held[0]["dir"], b=other["dir"]) + f": they were trained on different "
                                f"{what} ({key} {a[:12]}... vs {b[:12]}...: changed between their trainings?); "
                                f"train them again on the same data, or keep each version's runs in their own --runs")


def _numbered(folder, prefix):
    """{number: path} of the sub-folders of `folder` named <prefix><number>."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in os.listdir(folder):
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
        if m and os.path.isdir(os.path.join(folder, name)):
            out[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# AD: Table 3 (Sec. 4.3.6-4.3.7) and late fusion (App. B)

def find_ad_groups(runs, binary=False):
    """-> ({model: {(split seed, version): [4 fold dirs]}}, [incomplete groups as text]).

    Only (seed, version) groups whose four folds are all finished form an ensemble."""
    root = os.path.join(runs, "ad-binary" if binary else "ad")
    groups, incomplete = {}, []
    models = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for model in models:
        for seed, seed_dir in _numbered(os.path.join(root, model), "seed").items():
            for version, v_dir in _numbered(seed_dir, "v").items():
                folds = [os.path.join(v_dir, f"fold{f}") for f in range(N_FOLDS)]
                done = [f for f in range(N_FOLDS) if finished(folds[f])]
                if len(done) == N_FOLDS:
                    groups.setdefault(model, {})[(seed, version)] = folds
                else:
                    incomplete.append(f"{model} seed {seed} v{version}: folds {done or 'none'} of 0-3 finished")
    return groups, incomplete


def ensemble_ad_folds(fold_dirs):
    """The fold models of one (split seed, version) on their shared test set, combined by Eq. 7-8.

    Each predictions.npz already holds the test probabilities with both hippocampi averaged
    (Sec. 4.3.6). -> {"subjects", "labels", "probs" (N, C), "class_names", "config"}."""
    runs = [read_run(d) for d in fold_dirs]
    check_same_data(runs, "cannot ensemble {a} and {b}")
    check_compatible(runs, ENSEMBLE_KEYS)
    first = runs[0]
    for r in runs[1:]:
        if not np.array_equal(first["pred"]["labels"], r["pred"]["labels"]):
            raise UserError(f"cannot ensemble {first['dir']} and {r['dir']}: their test labels differ")
    probs = entropy_weighted_ensemble(np.stack([r["pred"]["probs"] for r in runs]))      # (K, N, C) -> (N, C)
    cfg = first["config"]
    names = list(cfg.get("class_names") or data.CLASS_NAMES[:cfg["classes"]])
    return {"subjects": first["pred"]["subjects"], "labels": first["pred"]["labels"], "probs": probs,
            "class_names": names, "config": cfg, "dir": first["dir"], "dirs": list(fold_dirs),
            "members": [r["pred"]["probs"] for r in runs]}


def metric_columns(class_names):
    """Table 3's columns: (title, getter of classification_metrics' dict); the paper's, then the calibration of
    the probabilities (metrics.calibration_metrics: lower is better), which the paper does not report."""
    cols = [("BA", lambda m: m["balanced_accuracy"]), ("PRC", lambda m: m["precision"]),
            ("F1", lambda m: m["f1_macro"]), ("AUC", lambda m: m["auc_macro"])]
    cols += [(f"TP-{c}", lambda m, c=c: m["tp_rate"][c]) for c in class_names]
    return cols + [(title, lambda m, k=k: m[k]) for title, k in CALIBRATION_COLUMNS]   # after the paper's


def ad_results(runs, binary=False, reference="hyperfusion", keep=None):
    """Table 3 from the runs folder.

    For every model and every (split seed, version) whose four folds are finished, the fold models
    are ensembled (Eq. 7-8) on the shared test set: one row of metrics. Late fusion (App. B) is
    the plain average of the imaging-only and tabular-only ensembles' probabilities for every
    (seed, version) both have. Per model: mean +- std over its rows, the Mann-Whitney p-value of
    each metric against the reference model's rows, and the confusion matrix summed over rows.
    keep: a dict to receive the ensembles, {model: {(seed, version): ensemble}}, for the figures (plots.py).
    """
    groups, incomplete = find_ad_groups(runs, binary)
    if not groups:
        raise UserError(f"{os.path.join(runs, 'ad-binary' if binary else 'ad')}: no model has four finished folds "
                        f"for any (split seed, version)" + (f" ({'; '.join(incomplete)})" if incomplete else ""))
    ensembles = {m: {key: ensemble_ad_folds(dirs) for key, dirs in g.items()} for m, g in groups.items()}
    check_same_data([e for ens in ensembles.values() for e in ens.values()],   # the rows and models of one table too
                    "cannot put {a} and {b} in one table")
    if "imaging" in ensembles and "tabular" in ensembles:                          # App. B: late fusion
        late = {}
        for key in sorted(set(ensembles["imaging"]) & set(ensembles["tabular"])):
            a, b = ensembles["imaging"][key], ensembles["tabular"][key]
            if not np.array_equal(a["subjects"], b["subjects"]) or a["class_names"] != b["class_names"]:
                raise UserError(f"late fusion of split seed {key[0]} v{key[1]}: the imaging and tabular runs have "
                                f"different test subjects or classes")
            late[key] = dict(a, probs=(a["probs"] + b["probs"]) / 2, dirs=[])     # no runs of its own
        if late:
            ensembles["late-fusion"] = late
    if keep is not None:
        keep.update(ensembles)
    class_names = next(iter(next(iter(ensembles.values())).values()))["class_names"]
    for m, ens in ensembles.items():
        for key, e in ens.items():
            if e["class_names"] != class_names:
                raise UserError(f"{m} split seed {key[0]} v{key[1]}: classes {e['class_names']}, other runs have "
                                f"{class_names}")
    columns = metric_columns(class_names)
    order = [m for m in AD_ORDER if m in ensembles] + sorted(m for m in ensembles if m not in AD_ORDER)
    models = []
    for m in order:
        rows = []
        for (seed, version), e in sorted(ensembles[m].items()):
            met = classification_metrics(e["labels"], e["probs"], class_names)
            rows.append({"split_seed": seed, "version": version, "metrics": met,
                         **{t: float(get(met)) for t, get in columns}})
        summary = {t: mean_std([r[t] for r in rows]) for t, _ in columns}
        models.append({"model": m, "title": AD_MODEL_TITLES.get(m, m), "n_rows": len(rows), "rows": rows,
                       "mean": {t: s[0] for t, s in summary.items()}, "std": {t: s[1] for t, s in summary.items()},
                       "confusion_matrix": np.sum([r["metrics"]["confusion_matrix"] for r in rows], 0).tolist()})
    ref = next((x for x in models if x["model"] == reference), None)
    for x in models:
        x["p_value"] = {t: (mann_whitney_p([r[t] for r in x["rows"]], [r[t] for r in ref["rows"]])
                            if ref is not None and x is not ref else float("nan")) for t, _ in columns}
    return {"task": "ad-binary" if binary else "ad", "runs": os.path.abspath(runs), "class_names": class_names,
            "columns": [t for t, _ in columns], "paper_columns": [t for t, _ in columns[:-len(CALIBRATION_COLUMNS)]],
            "reference": reference, "models": models, "incomplete": incomplete}


def ad_markdown(res):
    cols = res["columns"]
    out = [f"# {'Binary CN vs AD (App. B)' if res['task'] == 'ad-binary' else 'AD classification (Table 3)'}",
           "", f"Runs: {res['runs']}. Each row of a model is the Eq. 7-8 ensemble of its four fold models for one "
           f"(split seed, version); mean +- std (ddof 1) over those rows.", ""]
    out.append(markdown_table(["model", "rows"] + cols,
                              [[m["title"], m["n_rows"]] + [f"{fmt(m['mean'][t])} ± {fmt(m['std'][t])}" for t in cols]
                               for m in res["models"]]))
    ref = AD_MODEL_TITLES.get(res["reference"], res["reference"])
    out += ["", f"Two-sided Mann-Whitney U p-value of each model's rows against {ref}'s:", ""]
    out.append(markdown_table(["model"] + cols, [[m["title"]] + [fmt_p(m["p_value"][t]) for t in cols]
                                                 for m in res["models"] if m["model"] != res["reference"]]))
    out += ["", "Confusion matrices summed over rows (rows: true class, columns: predicted):", ""]
    names = res["class_names"]
    for m in res["models"]:
        cm = [[c] + row for c, row in zip(names, m["confusion_matrix"])]
        out += [f"**{m['title']}**", "", markdown_table(["true \\ pred"] + names, cm), ""]
    out += ["Rows per (split seed, version):", ""]
    out.append(markdown_table(["model", "seed", "version"] + cols,
                              [[m["title"], r["split_seed"], r["version"]] + [fmt(r[t]) for t in cols]
                               for m in res["models"] for r in m["rows"]]))
    if res["incomplete"]:
        out += ["", "Left out (not all four folds finished): " + "; ".join(res["incomplete"])]
    return "\n".join(out) + "\n"


def ad_csv_rows(res):
    """One line per model: mean, std and p-value of every column, then the summed confusion matrix."""
    cols = res["columns"]
    header = ["model", "rows"] + [f"{t} {s}" for t in cols for s in ("mean", "std", "p")] + ["confusion_matrix"]
    rows = [[m["title"], m["n_rows"]] + [v for t in cols for v in (m["mean"][t], m["std"][t], m["p_value"][t])]
            + [json.dumps(m["confusion_matrix"])] for m in res["models"]]
    return header, rows


def write_results(res, markdown, csv_table, out_dir, name):
    """results_<name>.md / .csv / .json in out_dir, each written atomically. -> the three paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"results_{name}.{ext}") for ext in ("md", "csv", "json")]
    write_text(markdown, paths[0])
    write_csv(csv_table[1], csv_table[0], paths[1], for_people=True)   # a folder named =1+1 shows as text
    write_json(res, paths[2])   # NaN -> null
    return paths


def evaluate_ad(runs, binary=False, out_dir=None, quiet=False, plots_dir=None):
    """The `ad` subcommand: Table 3 printed and written to results_ad.{md,csv,json}; its figures in plots_dir."""
    ensembles = {}
    res = ad_results(runs, binary, keep=ensembles)
    md = ad_markdown(res)
    paths = write_results(res, md, ad_csv_rows(res), out_dir or runs, res["task"])
    if not quiet:
        print(md)
        print("wrote " + ", ".join(paths))
    if plots_dir:
        res["plots"] = ad_figures(res, ensembles, plots_dir, quiet)
    return res


# ----------------------------------------------------------------------------------------------
# Brain age: ensembles of the 5 best versions (Sec. 4.2.2) and Fig. 4A

FIG4A = re.compile(r"(?P<base>.+)-train(?P<sex>M|F|mixed)")
FIG4A_TRAIN = {"M": "males", "F": "females", "mixed": "mixed (sex-balanced)"}


def brain_age_ensemble(version_dirs, top=5):
    """Eq. 6 over the `top` versions with the lowest validation MAE (Sec. 4.2.2).

    version_dirs {version: run dir} of finished runs -> {"versions", "val_mae", "members_mae",
    "metrics" (regression_metrics of the ensemble), "pred", "age", "sex", "subjects"}."""
    runs = {v: read_run(d) for v, d in version_dirs.items()}
    check_same_data(list(runs.values()), "cannot ensemble {a} and {b}")
    ranked = sorted(runs, key=lambda v: (runs[v]["metrics"]["val"]["mae"], v))[:top]
    chosen = [runs[v] for v in ranked]
    check_compatible(chosen, BRAIN_AGE_KEYS)
    p = chosen[0]["pred"]
    pred = mean_ensemble([r["pred"]["pred"] for r in chosen])                         # Eq. 6
    gap = fit = None
    if all("val_pred" in r["pred"] and np.array_equal(r["pred"]["val_subjects"], p["val_subjects"]) for r in chosen):
        val_pred = mean_ensemble([r["pred"]["val_pred"] for r in chosen])             # the same ensemble
        fit = age_bias_fit(p["val_age"], val_pred)
        gap = gap_summary(p["age"], pred, p["sex"], fit)
    version_mae = {v: runs[v]["metrics"]["test"]["mae"] for v in sorted(runs)}
    return {"versions": ranked, "val_mae": [runs[v]["metrics"]["val"]["mae"] for v in ranked],
            "members_mae": [version_mae[v] for v in ranked], "version_mae": version_mae,
            "metrics": regression_metrics(p["age"], pred, p["sex"]), "pred": pred, "age": p["age"], "sex": p["sex"],
            "subjects": p["subjects"], "available": sorted(runs), "gap": gap, "fit": fit, "dir": chosen[0]["dir"],
            "dirs": [version_dirs[v] for v in sorted(version_dirs)], "config": chosen[0]["config"]}


def brain_age_results(runs, top=5, keep=None):
    """Per model folder of <runs>/brain-age/: the top-5 ensemble's MAE overall, male, female; and the
    Fig. 4A table (rows: training set, columns: male / female / all test MAE) when -trainM/-trainF/
    -trainmixed folders exist. keep: a dict to receive each folder's ensemble, for the figures (plots.py)."""
    root = os.path.join(runs, "brain-age")
    folders = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        done = {v: d for v, d in _numbered(os.path.join(root, name), "v").items() if finished(d)}
        if done:
            folders[name] = done
    if not folders:
        raise UserError(f"{root}: no finished brain-age run")
    models, errors, ensembles = [], {}, []
    for name, dirs in folders.items():
        e = brain_age_ensemble(dirs, top)
        ensembles.append(e)
        if keep is not None:
            keep[name] = e
        check_same_data(ensembles, "cannot put {a} and {b} in one table")
        models.append({"folder": name, **{k: e[k] for k in ("versions", "available", "val_mae", "members_mae",
                                                             "version_mae", "metrics", "gap")}})
        errors[name] = (list(e["subjects"]), np.abs(e["pred"] - e["age"]))
    base = errors.get("hyperfusion")
    for m in models:  # paired on the same test scans: mean of |error| - |HyperFusion's error|, and its SE
        subjects, err = errors[m["folder"]]
        m["vs_hyperfusion"] = None
        if base and m["folder"] != "hyperfusion" and subjects == base[0]:
            d = err - base[1]
            m["vs_hyperfusion"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    fig4a = []
    for m in models:
        match = FIG4A.fullmatch(m["folder"])
        if match:
            fig4a.append({"model": match["base"], "train": match["sex"], "folder": m["folder"],
                          "male": m["metrics"]["mae_male"], "female": m["metrics"]["mae_female"],
                          "all": m["metrics"]["mae"]})
    order = {"M": 0, "F": 1, "mixed": 2}
    fig4a.sort(key=lambda r: (r["model"], order[r["train"]]))
    return {"task": "brain-age", "runs": os.path.abspath(runs), "top": top, "models": models, "fig4a": fig4a}


def brain_age_markdown(res):
    out = ["# Brain age (Sec. 4.2, Fig. 4)", "",
           f"Runs: {res['runs']}. Each row is the Eq. 6 ensemble of the {res['top']} versions with the lowest "
           f"validation MAE (fewer when fewer exist); MAE in years on the test set; a model's MAE minus "
           f"HyperFusion's is paired over the same test scans.", ""]
    out.append(markdown_table(
        ["model", "versions used", "MAE", "minus HyperFusion's (paired, ± SE)", "MAE male", "MAE female",
         "members' test MAE", "test MAE per version"],
        [[m["folder"], f"{', '.join(map(str, m['versions']))} of {len(m['available'])}", f"{m['metrics']['mae']:.2f}",
          "-" if not m["vs_hyperfusion"] else "{mean:+.2f} ± {se:.2f}".format(**m["vs_hyperfusion"]),
          f"{m['metrics']['mae_male']:.2f}", f"{m['metrics']['mae_female']:.2f}",
          "{:.2f} ± {:.2f}".format(*mean_std(m["members_mae"])).replace("nan", "-"),
          ", ".join(f"v{v} {mae:.2f}" for v, mae in m["version_mae"].items())] for m in res["models"]]))
    kept_all = [m["folder"] for m in res["models"] if len(m["available"]) <= res["top"]]
    if kept_all:  # Sec. 4.2.2's "5 best" chooses only among more than five
        out += ["", f"All versions kept, none chosen by validation MAE (no more than {res['top']} exist): "
                f"{', '.join(kept_all)}. Train more than {res['top']} versions (run-protocol --versions) for "
                f"Sec. 4.2.2's choice of the {res['top']} best."]
    gaps = [m for m in res["models"] if m["gap"]]
    if gaps:
        out += ["", "Brain-age gap (predicted minus chronological age) on the test set, mean in years; corrected: "
                "minus the linear age bias fitted on the validation set (Smith et al. 2019); r: correlation with age:",
                ""]
        out.append(markdown_table(
            ["model", "gap", "gap male", "gap female", "corrected male", "corrected female", "r before", "r after"],
            [[m["folder"]] + [f"{m['gap'][k]:+.2f}" for k in ("gap", "gap_male", "gap_female", "corrected_gap_male",
                                                               "corrected_gap_female", "r_gap_age",
                                                               "r_corrected_gap_age")] for m in gaps]))
    if res["fig4a"]:
        out += ["", "Fig. 4A: training set (rows) against test set (columns), ensemble MAE in years:", ""]
        out.append(markdown_table(["model", "trained on", "test: male", "test: female", "test: all"],
                                  [[r["model"], FIG4A_TRAIN[r["train"]], f"{r['male']:.2f}", f"{r['female']:.2f}",
                                    f"{r['all']:.2f}"] for r in res["fig4a"]]))
    return "\n".join(out) + "\n"


def evaluate_brain_age(runs, top=5, out_dir=None, quiet=False, plots_dir=None):
    """The `brain-age` subcommand: printed and written to results_brain-age.{md,csv,json}; figures in plots_dir."""
    ensembles = {}
    res = brain_age_results(runs, top, keep=ensembles)
    md = brain_age_markdown(res)
    table = (["model", "versions", "mae", "mae_male", "mae_female", "n"],
             [[m["folder"], " ".join(map(str, m["versions"])), m["metrics"]["mae"], m["metrics"]["mae_male"],
               m["metrics"]["mae_female"], m["metrics"]["n"]] for m in res["models"]])
    paths = write_results(res, md, table, out_dir or runs, "brain-age")
    if not quiet:
        print(md)
        print("wrote " + ", ".join(paths))
    if plots_dir:
        res["plots"] = brain_age_figures(res, ensembles, plots_dir, quiet)
    return res


# ----------------------------------------------------------------------------------------------
# Hyperlayer selection (Sec. 3.1.2, App. D)

def _spread(labels, n):
    """n indices taking the classes in turn (first subjects of each class), so a small batch holds every class."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out = []
    while len(out) < min(n, len(labels)):
        for idx in by_class:
            if idx and len(out) < n:
                out.append(idx.pop(0))
    return np.array(sorted(out))


def select_layers(task, data_csv=None, image_dir=None, data_dir="data", samples=8, draws=100, seed=0, verbose=False):
    """Sec. 3.1.2: the loss entropy of every candidate layer of the untrained image-only backbone
    (models.layer_loss_entropy), on one fixed batch of `samples` subjects. -> [(layer, entropy)], sorted."""
    torch.manual_seed(seed)
    csv_path = data_csv or builtin_cohort(task, data_dir)
    if task == "ad":
        table = data.read_ad_table(csv_path, image_dir)
        pick = _spread(table.labels, samples)
        crops = data.load_crops(None, csv_path)
        image = np.stack([crops(data.load_volume(table.image_paths[i], table.subjects[i]))[0] for i in pick])
        tabular = TabularPreprocessor().fit(table.raw).transform([table.raw[i] for i in pick])
        target = torch.as_tensor(table.labels[pick])
        model = build_model("ad", "imaging", n_tabular=tabular.shape[1], n_classes=3)
        loss_fn = F.cross_entropy
    elif task == "brain-age":
        table = data.read_brain_age_table(csv_path, image_dir)
        pick = _spread(table.sex, samples)
        image = np.stack([data.load_volume(table.image_paths[i], table.subjects[i]) for i in pick])
        tabular = data.sex_onehot(table.sex[pick])
        target = torch.as_tensor(AgeTarget(float(table.age.mean())).encode(table.age[pick]))  # as in training
        model = build_model("brain-age", "imaging", image_shape=image.shape[1:])
        loss_fn = lambda pred, y: F.mse_loss(pred.float(), y)                    # Eq. 4
    else:
        raise UserError(f"unknown task {task!r}: expected ad or brain-age")
    batch = (torch.as_tensor(image, dtype=torch.float32)[:, None], torch.as_tensor(tabular), target)
    if verbose:  # every draw is one forward pass of the whole network: say how long that will take
        model.eval()
        with torch.no_grad():
            model(*batch[:2])                                   # warm-up, then time one forward pass
            t0 = time.time()
            model(*batch[:2])
        n = len(candidate_layers(model))
        print(f"{n} candidate layers x {draws} draws, {len(pick)} subjects of {csv_path}: about "
              f"{duration_text((time.time() - t0) * n * draws)}", flush=True)
    return layer_loss_entropy(model, batch, loss_fn, n_draws=draws, seed=seed)


# ----------------------------------------------------------------------------------------------
# Command line

def arguments():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ad", help="Table 3 from <runs>/ad (or ad-binary): ensembles of the four folds")
    a.add_argument("--binary", action="store_true", help="CN vs AD runs (App. B), <runs>/ad-binary")
    a.add_argument("--out", help="folder of results_ad.{md,csv,json} (default: --runs)")
    b = sub.add_parser("brain-age", help="MAE of the 5-best ensembles (Eq. 6) and Fig. 4A from <runs>/brain-age")
    b.add_argument("--top", type=int, default=5, help="versions per ensemble, lowest validation MAE first")
    b.add_argument("--out", help="folder of results_brain-age.{md,csv,json} (default: --runs)")
    s = sub.add_parser("select-layers", help="Sec. 3.1.2: loss entropy of every candidate layer, sorted")
    s.add_argument("--task", required=True, choices=["ad", "brain-age"])
    s.add_argument("--samples", type=int, default=8, help="subjects in the fixed batch")
    s.add_argument("--draws", type=int, default=100, help="re-initialisations per layer")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="also write the table to this markdown file")
    s.add_argument("--quiet", action="store_true", help="no estimate nor time taken: the table alone")
    w = sub.add_parser("sweep", help="the test set read with one tabular attribute set to each value in turn")
    w.add_argument("checkpoint", help="a run folder, or its best.pt")
    w.add_argument("--attribute", required=True, help="AD: AGE, PTGENDER, ABETA, ...; brain age: Sex")
    w.add_argument("--values", required=True, nargs="+")
    w.add_argument("--data-csv", help="default: the run's own (its path is stored relative to where it ran)")
    w.add_argument("--image-dir")
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    for sp in (a, b, w):
        sp.add_argument("--plots", metavar="DIR", help="also draw the figures as PNG files in DIR (needs matplotlib)")
    sub.add_parser("calibrate", add_help=False,
                   help="temperature scaling of every AD run under RUNS, and its report (its options)")
    sub.add_parser("protocol", add_help=False,
                   help="train every missing run of the protocol, then print the table (its options)")
    for sp in (a, b):
        sp.add_argument("--runs", default="runs")
    s.add_argument("--data-csv", help="default: the built-in synthetic cohort")
    s.add_argument("--image-dir")
    s.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["protocol"]:
        return protocol_main(argv[1:])
    if argv[:1] == ["calibrate"]:
        return calibrate_main(argv[1:])
    a = arguments().parse_args(argv)
    for option, least in (("top", 1), ("samples", 2), ("draws", 1), ("seed", 0), ("batch_size", 1)):
        check_number("--" + option.replace("_", "-"), getattr(a, option, None), least=least)
    if getattr(a, "plots", None):      # before any work: without matplotlib nothing is computed, nothing written
        check_plots_folder(a.plots)
    if a.command == "ad":
        return evaluate_ad(a.runs, a.binary, a.out, plots_dir=a.plots)
    if a.command == "brain-age":
        return evaluate_brain_age(a.runs, a.top, a.out, plots_dir=a.plots)
    if a.command == "select-layers":
        if a.out:
            check_output("--out", a.out, [a.data_csv])
        t0 = time.time()
        scores = select_layers(a.task, a.data_csv, a.image_dir, a.data_dir, a.samples, a.draws, a.seed, not a.quiet)
        table = markdown_table(["rank", "layer", "entropy"],
                               [[k + 1, n, f"{max(h, 0.0):.3f}"] for k, (n, h) in enumerate(scores)])
        md = (f"# Loss entropy per layer (Sec. 3.1.2), {a.task}: image-only backbone, untrained, {a.samples} "
              f"subjects, {a.draws} draws\n\n{table}\n")
        print(md)
        if a.out:
            write_text(md, a.out)
            print(f"wrote {a.out}")
        if not a.quiet:
            print(duration_text(time.time() - t0))
        return scores
    if a.command == "sweep":
        res = predict.sweep(a.checkpoint, a.attribute, a.values, a.data_csv, a.image_dir, a.batch_size, a.device)
        md = predict.sweep_markdown(res)
        path = os.path.join(res["dir"], f"sweep_{res['attribute']}.md")
        write_text(md, path)
        print(md)
        print(f"wrote {path}")
        if a.plots:
            res["plots"] = sweep_figure(res, a.plots)
        return res


# ---- launcher ----------------------------------------------------------------------------------
# Independent training runs launched as separate processes, K at a time, one GPU each (run-protocol --jobs K).
#
# The paper's AD protocol is 216 runs of a small model (Sec. 4.3.6): on several GPUs one run per GPU
# beats splitting each run over all of them. Each run here is its training script started with the
# same options the serial runner parses in-process, in its own process; a run may wait for another
# (HyperFusion for the tabular-only MLP of its split seed, version and fold, whose embedding it starts
# from). With `gpus` each process sees one GPU (CUDA_VISIBLE_DEVICES); without, each gets cores / K
# threads (OMP_NUM_THREADS, unless set).

@dataclass
class Job:
    run_dir: str
    command: list                  # [python, script, options...]
    after: str = None              # run_dir of a job that must finish first (None: none)
    kind: str = ""                 # what it trains (the model): the time left is estimated per kind (Progress)
    label: str = None              # how its progress line names it (None: run_dir)


def gpu_masks(gpus, visible_count, environ=None):
    """--gpus indices -> the CUDA_VISIBLE_DEVICES of each slot's process. An index counts among the GPUs this
    process sees: under CUDA_VISIBLE_DEVICES=4,5,6,7, --gpus 0,1 means physical GPUs 4 and 5. An index past the
    `visible_count` GPUs seen is refused in one line."""
    environ = os.environ if environ is None else environ
    mask = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    seen = mask if "CUDA_VISIBLE_DEVICES" in environ else [str(i) for i in range(visible_count)]
    seen = seen[:visible_count]
    bad = [g for g in gpus if not 0 <= g < len(seen)]
    if bad:
        where = (f" (CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in environ
                 else "")
        raise UserError(f"--gpus {','.join(map(str, gpus))}: GPU {bad[0]} does not exist here: {len(seen)} visible"
                        f"{where}, indices 0 to {len(seen) - 1}" if seen else
                        f"--gpus {','.join(map(str, gpus))}: no GPU is visible here{where}")
    return [seen[g] for g in gpus]


def run_jobs(jobs, k, gpus=None, poll_s=0.2, quiet=False):
    """Run every job, at most k at a time, each after its `after`; one line per job started and finished,
    the finished one with its final line and the time left (Progress.item_done, per kind; quiet: none). A
    failure stops new starts, lets the running ones finish, then raises UserError naming the run and the end of
    its output. gpus: the CUDA_VISIBLE_DEVICES values of the slots (gpu_masks). -> the run dirs in the order
    they finished.
    Interrupted (Ctrl-C, SIGTERM as data.Terminated, or any error here), it ends the runs it started
    (stop) before it goes on up, so that no training is left running with no one to wait for it."""
    if gpus is not None and not gpus:
        raise UserError("--gpus: give at least one GPU index, e.g. --gpus 0,1")
    running = {}
    try:
        return schedule(jobs, k, gpus, poll_s, running, quiet)
    except BaseException:
        stop(running)
        raise


def stop(running, grace_s=60):
    """SIGTERM to every running job (a training script saves nothing more and exits, last.pt intact), then
    SIGKILL to any still there after grace_s."""
    procs = [proc for _, _, (proc, _), _ in running.values()]
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def schedule(jobs, k, gpus, poll_s, running, quiet=False):
    """run_jobs's loop; `running` ({run_dir: (job, slot, (process, output), started)}) is its caller's to stop."""
    waiting, finished, failed = list(jobs), [], None
    slots = list(range(k))                                   # slot s runs on gpus[s % len(gpus)]
    pending = {j.run_dir for j in jobs}
    shown = Progress("train", None, "runs", quiet, kinds=[j.kind for j in jobs], parallel=k)
    while waiting or running:
        while failed is None and slots and waiting:
            job = next((j for j in waiting if j.after not in pending), None)
            if job is None:
                break
            waiting.remove(job)
            slot = slots.pop(0)
            running[job.run_dir] = (job, slot, start(job, slot, k, gpus), time.time())
            where = f" on GPU {gpus[slot % len(gpus)]}" if gpus else ""
            shown.say(f"started{where}: {job.run_dir}")
        if failed is not None and not running:
            break
        time.sleep(poll_s)
        for run_dir, (job, slot, (proc, out), started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run_dir]
            slots.append(slot)
            out.seek(0)
            lines = out.read().decode(errors="replace").strip().splitlines()
            out.close()
            if proc.returncode != 0:
                failed = failed or f"{run_dir}: training failed (exit {proc.returncode}): " + \
                    (lines[-1] if lines else "no output")
                continue
            pending.discard(run_dir)
            finished.append(run_dir)
            result = f": {lines[-1].replace(f' -> {run_dir}', '')}" if lines else ""    # its final line
            now = time.time()
            shown.item_done(job.kind, now - started, job.label or run_dir, result,
                            spent=sum(now - t for _, _, _, t in running.values()))
    if failed is not None:
        raise UserError(failed)
    return finished


def start(job, slot, k, gpus):
    """-> (the process of one job, the file that collects its output). gpus: CUDA_VISIBLE_DEVICES values."""
    env = dict(os.environ, LOCAL_WORLD_SIZE=str(k))          # k processes share this machine's cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // k)))
    command = job.command
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
        command = command + ["--device", "cuda"]
    out = tempfile.TemporaryFile()
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), out


# ---- protocol ----------------------------------------------------------------------------------
# The protocol runner (Sec. 4.2.2, 4.3.6): train every run of a task's protocol that is missing, then its table.
#
#     python evaluate.py protocol --task ad --split-seeds 0 1 2 --versions 0 1 2          # Table 3's runs, then Table 3
#     python evaluate.py protocol --task brain-age --versions 0 1 2 3 4 5 6               # Sec. 4.2.2's versions, then Fig. 4
#     python evaluate.py protocol --task ad --split-seeds 0 1 2 --versions 0 1 2 --jobs 4 --gpus 0,1,2,3   # 4 runs at a time
#     python evaluate.py protocol --task ad --split-seeds 0 1 2 --versions 0 1 2 --print-commands > runs.txt  # a job array
#
# Finished runs (a metrics.json) are skipped, interrupted ones resume from last.pt, and finished runs of
# other data are refused before anything trains (check_protocol_data). --jobs K runs K trainings at a time,
# each its training script in a process of its own (launcher.py), one GPU each with --gpus; HyperFusion
# waits for the tabular-only MLP its embedding starts from. The table at the end is evaluate.py's.
# `python evaluate.py run-protocol ...` is the same command with the same options.

def check_protocol_data(finished_dirs, task, data_csv=None, image_dir=None, data_dir="data", must=True, cache_dir=None):
    """The finished runs a protocol skips were trained on the table and the images it would train the others on:
    the table's sha256 and the images' fingerprint held in their checkpoints, compared with those of the data now.
    A difference is refused before anything trains (must: some runs are still to train, which would mix two
    versions of the data in one result), else warned (the results are then all of the data the runs had)."""
    csv_path, now, fingerprints = None, None, {}
    for d in finished_dirs:
        r = load_run(d)
        held, problem = r.inputs.get("table_sha256"), None
        if not held:            # a run of a version of this code that did not tie runs to their data
            continue
        if now is None:
            csv_path = data_csv or builtin_cohort(task, data_dir)
            now = data.table_sha256(csv_path)
        if held != now:
            problem = (f"{d} was trained on another version of {csv_path} (table sha256 {held[:12]}..., now "
                       f"{now[:12]}...: edited since?)")
        elif r.inputs.get("images_sha256"):
            key = (r.run.classes, json.dumps(r.run.group_map, sort_keys=True))   # the rows, so the images, it read
            if key not in fingerprints:
                table = (data.read_ad_table(csv_path, image_dir, classes=r.run.classes, group_map=r.run.group_map)
                         if task == "ad" else data.read_brain_age_table(csv_path, image_dir))
                fingerprints[key] = data.image_fingerprint(table.image_paths, data.cache_folder(cache_dir, csv_path),
                                                           table.subjects)
            if fingerprints[key] != r.inputs["images_sha256"]:
                problem = (f"{d} was trained on other images than {csv_path} names now (images_sha256 "
                           f"{r.inputs['images_sha256'][:12]}..., now {fingerprints[key][:12]}...: replaced or "
                           f"re-preprocessed since?)")
        if problem and must:
            raise UserError(problem + "; training the missing runs would mix two versions of the data in one result: "
                            "restore the data, or train them all again into another --runs folder")
        if problem:
            warn(problem + "; every run is finished, so the results are all of the data they were trained on")


def run_protocol(task, runs="runs", split_seeds=(0,), versions=None, models=None, epochs=None, data_csv=None,
                 image_dir=None, data_dir="data", binary=False, train_sex=("all",), embedding_dim=1, verbose=False,
                 tabular_epochs=None, jobs=1, gpus=None, print_commands=False, quiet=False, cache_dir=None):
    """Train every run of the protocol that has no metrics.json yet (an interrupted one resumes from
    last.pt), skip the finished ones, then build the task's table. -> (trained, skipped, results).

    jobs > 1: that many runs at a time, each its training script in its own process (launcher.py),
    with `gpus` one GPU each; HyperFusion waits for the tabular-only run of its split seed, version
    and fold when that run is part of the protocol (its embedding starts from it, Sec. 4.3.6).

    print_commands: train nothing; print one shell command per missing run instead (with --resume where
    a last.pt exists), every tabular-only run before any HyperFusion run, for a scheduler (a SLURM job
    array, GNU parallel). -> (commands, skipped, None). After each run, `run k of N done (...); about ... left`
    (Progress.item_done, per model); quiet: no line but the table's."""
    t0 = time.time()
    common = ["--out", runs, "--data-dir", data_dir] \
        + (["--data-csv", data_csv] if data_csv else []) + (["--image-dir", image_dir] if image_dir else []) \
        + (["--cache-dir", cache_dir] if cache_dir else []) \
        + ([] if verbose else ["--quiet"])
    schedule = lambda model: ["--epochs", str(tabular_epochs if model == "tabular" and tabular_epochs else epochs)] \
        if (epochs or (model == "tabular" and tabular_epochs)) else []
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give 1 or more runs at a time")
    n_jobs, jobs = jobs, []  # (run dir, parser, train function, argv, script, run dir to wait for)
    if task == "ad":
        for model in models or AD_MODELS:
            if model not in AD_MODELS:
                raise UserError(f"--models {model}: not an AD model (one of {', '.join(AD_MODELS)})")
            for s in split_seeds:
                for v in versions if versions is not None else (0,):
                    for f in range(N_FOLDS):
                        argv = ["--model", model, "--split-seed", str(s), "--version", str(v), "--fold", str(f)] \
                            + (["--classes", "2"] if binary else []) + schedule(model) + common
                        after = ad_run_dir(runs, "tabular", s, v, f, binary) if model == "hyperfusion" else None
                        jobs.append((ad_run_dir(runs, model, s, v, f, binary), train_ad.ad_arguments,
                                     lambda a: train_ad.train_ad(a), argv, train_ad.__file__, after))
    elif task == "brain-age":
        if len(split_seeds) != 1:
            raise UserError("brain-age runs are not kept per split seed (runs/brain-age/<model>/v<V>): give one "
                            "--split-seeds value")
        for model in models or BRAIN_AGE_MODELS:
            if model not in BRAIN_AGE_MODELS:
                raise UserError(f"--models {model}: not a brain-age model (one of {', '.join(BRAIN_AGE_MODELS)})")
            for sex in train_sex:
                for v in versions if versions is not None else range(5):
                    argv = ["--model", model, "--version", str(v), "--split-seed", str(split_seeds[0]),
                            "--embedding-dim", str(embedding_dim), "--train-sex", sex] + schedule(model) + common
                    run_dir = brain_age_run_dir(runs, model, v, embedding_dim, sex)
                    jobs.append((run_dir, train_brain_age.brain_age_arguments,
                                 lambda a: train_brain_age.train_brain_age(a), argv, train_brain_age.__file__, None))
    else:
        raise UserError(f"unknown task {task!r}: expected ad or brain-age")
    trained, skipped, todo = [], [], []
    done = [job[0] for job in jobs if finished(job[0])]
    if done:   # before anything trains: the finished runs must be of the data the others would train on
        check_protocol_data(done, task, data_csv, image_dir, data_dir, len(done) < len(jobs), cache_dir)
    if print_commands:    # the tabular-only MLPs first: HyperFusion's embedding starts from them (Sec. 4.3.6)
        jobs.sort(key=lambda j: j[4] != train_ad.__file__ or "--model tabular" not in " ".join(j[3]))
    shown = Progress("train", None, "runs", quiet or print_commands,     # kinds: the models, each its own pace
                     kinds=[argv[1] for run_dir, _, _, argv, _, _ in jobs if not finished(run_dir)])
    label = lambda run_dir: " ".join(os.path.relpath(run_dir, runs).split(os.sep))     # ad hyperfusion seed0 v0 fold2
    for k, (run_dir, parser, train, argv, script, after) in enumerate(jobs):
        if finished(run_dir):
            skipped.append(run_dir)
            shown.say(f"[{k + 1}/{len(jobs)}] skipped (finished): {run_dir}")
            continue
        resume = os.path.isfile(os.path.join(run_dir, "last.pt"))
        argv = argv + (["--resume"] if resume else [])
        if print_commands:
            trained.append(shlex.join(["python", os.path.basename(script)] + argv))
            print(trained[-1], flush=True)
            continue
        if n_jobs > 1 or gpus:    # --gpus with --jobs 1: one run at a time, each in a process on its GPU
            todo.append(Job(run_dir, [sys.executable, script] + argv, after, argv[1], label(run_dir)))
            continue
        shown.say(f"[{k + 1}/{len(jobs)}] {'resuming' if resume else 'training'}: {run_dir}")
        with shown.hushed():
            t1 = time.time()
            train(vars(parser().parse_args(argv)))
        trained.append(run_dir)
        shown.item_done(argv[1], time.time() - t1, label(run_dir))
    if print_commands:
        return trained, skipped, None
    if todo:
        masks = gpu_masks(gpus, torch.cuda.device_count()) if gpus else None
        trained = run_jobs(todo, n_jobs, masks, quiet=quiet)
    shown.say(f"protocol: {len(trained)} trained, {len(skipped)} skipped, {duration_text(time.time() - t0)}")
    res = evaluate_ad(runs, binary) if task == "ad" else evaluate_brain_age(runs)
    shown.say(f"total wall time {duration_text(time.time() - t0)}")
    return trained, skipped, res


def protocol_arguments():
    r = ArgumentParser(prog="evaluate.py protocol", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--task", required=True, choices=["ad", "brain-age"])
    r.add_argument("--split-seeds", type=int, nargs="+", default=[0])
    r.add_argument("--versions", type=int, nargs="+", help="default: 0 (AD), 0 1 2 3 4 (brain age)")
    r.add_argument("--models", nargs="+", help="default: every model of the task")
    r.add_argument("--epochs", type=int, help="default: the training scripts' (Table 1, or the demo schedule)")
    r.add_argument("--tabular-epochs", type=int, help="AD: epochs of the tabular-only MLP (cheap; default --epochs)")
    r.add_argument("--binary", action="store_true", help="AD: CN vs AD (App. B)")
    r.add_argument("--train-sex", nargs="+", default=["all"], choices=["all", "M", "F", "mixed"],
                   help="brain age: training sets (Fig. 4A: M F mixed)")
    r.add_argument("--embedding-dim", type=int, default=1, choices=[1, 2], help="brain age: sex embedding size")
    r.add_argument("--verbose", action="store_true", help="the training scripts' per-epoch lines (--jobs 1)")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (1: in this one)")
    r.add_argument("--gpus", type=lambda v: [int(g) for g in v.split(",") if g != ""],
                   help="with --jobs: GPU indices shared out to the runs, one each, e.g. 0,1,2,3")
    r.add_argument("--print-commands", action="store_true",
                   help="train nothing: print one command per missing run (tabular-only first), for a scheduler")
    r.add_argument("--quiet", action="store_true", help="no progress lines: the table (and its files) alone")
    r.add_argument("--runs", default="runs")
    r.add_argument("--data-csv", help="default: the built-in synthetic cohort")
    r.add_argument("--image-dir")
    r.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    r.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache; somewhere writable when the "
                   "data is on read-only storage)")
    return r


def protocol_main(argv=None):
    a = protocol_arguments().parse_args(argv)
    for option, least in (("split_seeds", 0), ("versions", 0), ("epochs", 1), ("tabular_epochs", 1)):
        check_number("--" + option.replace("_", "-"), getattr(a, option, None), least=least)
    return run_protocol(a.task, a.runs, a.split_seeds, a.versions, a.models, a.epochs, a.data_csv, a.image_dir,
                        a.data_dir, a.binary, a.train_sex, a.embedding_dim, a.verbose, a.tabular_epochs, a.jobs, a.gpus,
                        a.print_commands, a.quiet, a.cache_dir)


if __name__ == "__main__":
    run_cli(main)
