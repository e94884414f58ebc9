"""The paper's evaluation (Eq. 6-8, Sec. 3.1.2, 4.2, 4.3.6-4.3.7, App. B), its figures, the calibration report, and
the protocol runner that trains the runs they read.

    python evaluate.py ad --runs runs/ [--binary]         # Table 3 (App. B: CN vs AD, from runs/ad-binary/)
    python evaluate.py brain-age --runs runs/             # Fig. 4: ensemble of the 5 best versions
    python evaluate.py select-layers --task ad            # Sec. 3.1.2: loss entropy of every layer
    python evaluate.py sweep runs/ad/hyperfusion/seed0/v0/fold0 --attribute ABETA --values 500 1500
    python evaluate.py calibrate runs/                    # temperature scaling of every AD run, and its report
    python evaluate.py protocol --task ad --split-seeds 0 1 2 --versions 0 1 2 --jobs 4   # train what is missing

Tables go to results_<task>.{md,csv,json} beside the runs; `--plots DIR` also draws the figures as PNG files (needs
matplotlib). Bad input (mismatched runs, missing files) -> one line `error: ...` on stderr, exit status 2.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

import data
import predict
import train_ad
import train_brain_age
from data import (ArgumentParser, Progress, TabularPreprocessor, UserError, atomic_path, check_folder, check_number,
                  check_output, duration_text, matplotlib_or_none, run_cli, write_csv, write_json, write_text)
from metrics import (CALIBRATION_BINS, CALIBRATION_COLUMNS, age_bias_fit, classification_metrics, corrected_gap,
                     entropy_weighted_ensemble, expected_calibration_error, fmt, fmt_p, gap_summary, mann_whitney_p,
                     markdown_table, mean_ensemble, mean_std, regression_metrics, reliability, shown)
from models import (AD_MODEL_TITLES, AD_MODELS, BRAIN_AGE_MODELS, AgeTarget, build_model, candidate_layers,
                    layer_loss_entropy)
from synthetic import builtin_cohort
from training import (CALIBRATION_FILE, ad_run_dir, brain_age_run_dir, calibrate, calibration_change, cores, finished,
                      load_run, probabilities, read_logits, save_logits, setup_device)

AD_ORDER = ("imaging", "tabular", "late-fusion", "concat", "film", "daft", "hyperfusion")  # Table 3's order
N_FOLDS = 4
TITLES = {"ad": "AD classification (Table 3)", "ad-binary": "Binary CN vs AD (App. B)"}
FIG4A = re.compile(r"(?P<base>.+)-train(?P<sex>M|F|mixed)")
FIG4A_TRAIN = {"M": "males", "F": "females", "mixed": "mixed (sex-balanced)"}


# ---- Figures: PNG files of size x DPI pixels, written atomically; matplotlib imported only to draw them ----
DPI, SMALL, WIDE = 100, (5, 4), (9, 4)    # inches: one panel (500 x 400 pixels at DPI), two side by side
SEX_COLOURS = {0: ("male", "tab:blue"), 1: ("female", "tab:pink")}
FIG4A_BARS = (("M", "trained on males", "tab:blue"), ("F", "trained on females", "tab:pink"),
              ("mixed", "trained on a mix", "tab:green"))                    # Sec. 4.2.4: blue, pink, green
FIG4B_BARS = (("imaging", "image only", "tab:orange"), ("concat", "concatenation", "lightblue"),
              ("hyperfusion", "HyperFusion (sex -> 1 scalar)", "purple"),
              ("hyperfusion-emb2", "HyperFusion (sex -> 2D)", "olive"))        # Sec. 4.2.5's colours
TEST_SETS = (("mae_male", "male"), ("mae_female", "female"), ("mae", "all"))
AD_COLOURS = {"imaging": "tab:orange", "tabular": "tab:gray", "late-fusion": "tab:brown", "concat": "lightblue",
              "film": "tab:green", "daft": "tab:cyan", "hyperfusion": "purple"}   # one colour a model, as Fig. 4B


def check_plots_folder(folder):
    """Before any work: --plots needs matplotlib and a folder, else nothing is computed nor half-written."""
    if matplotlib_or_none() is None:
        raise UserError("--plots needs matplotlib: pip install matplotlib")
    check_folder("--plots", folder, "the PNG files")


def file_part(name):
    """A model or folder name as part of a file name: anything but letters, digits, . _ - becomes _."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip(".") or "_"


class Figures:
    """Where one command's figures go: save() writes one atomically, skip() says which is not drawn and why."""

    def __init__(self, folder, quiet=False):
        check_plots_folder(folder)
        import matplotlib.pyplot as plt         # optional: only `--plots` needs it
        self.plt, self.folder, self.summary = plt, folder, {"written": [], "skipped": {}}
        self.say = (lambda line: None) if quiet else print
        os.makedirs(folder, exist_ok=True)

    def new(self, size=SMALL, panels=1):
        return self.plt.subplots(1, panels, figsize=size, dpi=DPI)   # size x DPI pixels, kept by save

    def save(self, fig, name):
        path = os.path.join(self.folder, name)
        try:
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=DPI)        # no bbox_inches="tight": the size stays size x DPI
        finally:
            self.plt.close(fig)
        self.summary["written"].append(path)
        self.say(f"wrote {path}")

    def skip(self, name, why):
        self.summary["skipped"][name] = why
        self.say(f"skipped {name}: {why}")


def grouped_bars(figs, ticks, series, size=SMALL, annotate=True):
    """Table 3's and Fig. 4's bars: a group per tick, a bar per series -> (figure, axes, bar positions)."""
    fig, ax = figs.new(size)
    x, width, where = np.arange(len(ticks)), 0.8 / len(series), []
    for k, (label, values, style) in enumerate(series):
        where.append(x - 0.4 + width * (k + 0.5))
        bars = ax.bar(where[-1], np.nan_to_num(np.asarray(values, float)), width, label=label, **style)
        if annotate:
            ax.bar_label(bars, [f"{v:.2f}" if np.isfinite(v) else "" for v in values], fontsize=6)
    ax.set_xticks(x, ticks, fontsize=7)
    return fig, ax, where


def diagonal(ax, **axis):
    """The dashed identity line of a ROC curve or a reliability diagram, on the unit square."""
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), **axis)


def confusion_figure(figs, file, cm, class_names, title):
    """Two panels: the counts, and each row divided by its true class's count."""
    cm, n = np.asarray(cm, float), len(class_names)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(1, keepdims=True)
    fig, axes = figs.new(WIDE, 2)
    for ax, values, top, what in ((axes[0], cm, max(cm.max(), 1), "counts"), (axes[1], norm, 1, "row-normalised")):
        ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0, vmax=top)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{int(v)}" if values is cm else "-" if not np.isfinite(v) else f"{v:.2f}", fontsize=9,
                    ha="center", va="center", color="white" if np.nan_to_num(v) / top > 0.5 else "black")
        ax.set(xticks=range(n), yticks=range(n), xticklabels=class_names, yticklabels=class_names,
               xlabel="predicted", ylabel="true", title=what)
    fig.suptitle(title, fontsize=10)
    figs.save(fig, file)


def roc_figure(figs, file, labels, probs, class_names, title):
    """One-vs-rest ROC curve of every class, its AUC in the legend."""
    fig, ax = figs.new(SMALL)
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} vs rest: no {'negatives' if positive.all() else 'positives'}")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest: AUC {fmt(roc_auc_score(positive, probs[:, c]))}")
    diagonal(ax, xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    figs.save(fig, file)


def reliability_figure(figs, file, curves, title):
    """Reliability diagram of each (name, labels, probs), ECE in the legend; right, subjects per bin."""
    fig, (ax, counts_ax) = figs.new(WIDE, 2)
    for k, (name, labels, probs) in enumerate(curves):
        probs = np.asarray(probs, float)
        hit, confidence = probs.argmax(1) == np.asarray(labels), probs.max(1)
        observed, predicted, _ = reliability(hit, confidence)
        style = dict(lw=2.0, marker="o", ms=4) if k < 2 and "ensemble" in name else dict(lw=0.8, alpha=0.6)
        line, = ax.plot(predicted, observed, label=f"{name}: ECE {fmt(expected_calibration_error(hit, confidence))}",
                        **style)
        counts_ax.hist(confidence, np.linspace(0, 1, CALIBRATION_BINS + 1), histtype="step", color=line.get_color(),
                       lw=style["lw"], label=name)
    diagonal(ax, xlabel="confidence (largest probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=7)
    counts_ax.set(xlim=(0, 1), xlabel=f"confidence bin ({CALIBRATION_BINS} of width 1/{CALIBRATION_BINS})",
                  ylabel="subjects", title="subjects per bin")
    figs.save(fig, file)


def ad_figures(res, ensembles, folder, quiet=False):
    """ad --plots: per row its confusion matrix, ROC and reliability diagram; Table 3 as bars."""
    figs, tag, names = Figures(folder, quiet), "_binary" if res["task"] == "ad-binary" else "", res["class_names"]
    for m in res["models"]:
        for r in m["rows"]:
            e = ensembles[m["model"]][(r["split_seed"], r["version"])]
            stem = f"{file_part(m['model'])}_seed{r['split_seed']}_v{r['version']}{tag}"
            what = f"{m['title']}, split seed {r['split_seed']}, v{r['version']}"
            confusion_figure(figs, f"confusion_{stem}.png", r["metrics"]["confusion_matrix"], names,
                             f"{what}: BA {fmt(r['BA'])}")
            roc_figure(figs, f"roc_{stem}.png", e["labels"], e["probs"], names, f"{what}\nmacro AUC {fmt(r['AUC'])}")
            reliability_figure(figs, f"reliability_{stem}.png", [("ensemble", e["labels"], e["probs"])] + [
                (f"fold {k}", e["labels"], p) for k, p in enumerate(e["members"])], f"{what}: test set")
    cols, colours = res["paper_columns"], figs.plt.get_cmap("tab10")
    series = [(f"{m['title']} ({m['n_rows']} row{'s' * (m['n_rows'] != 1)})", [m["mean"][t] for t in cols],
               dict(yerr=np.nan_to_num([m["std"][t] for t in cols]) if m["n_rows"] > 1 else None, capsize=1.5,
                    color=AD_COLOURS.get(m["model"], colours(k % 10)), error_kw={"lw": 0.8}))
              for k, m in enumerate(res["models"])]
    fig, ax, where = grouped_bars(figs, cols, series, WIDE, annotate=False)
    for m, pos in zip(res["models"], where):
        for j, t in enumerate(cols if m["n_rows"] > 1 else ()):
            ax.scatter(np.full(m["n_rows"], pos[j]), [r[t] for r in m["rows"]], s=3, color="black", zorder=3)
    ax.set(ylim=(0, 1.05), ylabel="test set, ensemble of 4 folds per row",
           title=TITLES[res["task"]] + ": mean ± std over rows")
    ax.legend(fontsize=6, ncol=min(4, len(series)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    figs.save(fig, f"table3{tag}.png")
    return figs.summary


def scatter_figure(figs, file, e, title):
    """Predicted against true age by sex; with e["fit"], left the age bias, right the corrected ages."""
    age, pred, sex, fit = np.asarray(e["age"], float), np.asarray(e["pred"], float), np.asarray(e["sex"]), e["fit"]
    fig, axes = figs.new(WIDE if fit else SMALL, 2 if fit else 1)
    panels = [(pred, "as predicted")] + ([(age + corrected_gap(age, pred, fit), "age bias corrected")] if fit else [])
    line = np.array([min(age.min(), *(y.min() for y, _ in panels)), max(age.max(), *(y.max() for y, _ in panels))])
    for k, (ax, (y, what)) in enumerate(zip(axes if fit else [axes], panels)):
        for code, (name, colour) in SEX_COLOURS.items():
            ax.scatter(age[sex == code], y[sex == code], s=6, alpha=0.6, color=colour, label=name)
        ax.plot(line, line, color="black", lw=0.8, label="identity")
        if fit:                 # right: a description of what is left, not a second correction
            bias, colour = (fit, "tab:red") if k == 0 else (age_bias_fit(age, y), "tab:green")
            ax.plot(line, line + bias["intercept"] + bias["slope"] * line, color=colour, ls="--", lw=1.2,
                    label=(f"age bias (validation fit, n {fit['n']})" if k == 0 else "least squares on the test "
                           "scans") + f": slope {bias['slope']:+.2f}")
        r = e["gap"] and e["gap"]["r_corrected_gap_age" if k else "r_gap_age"]
        ax.set(xlabel="chronological age (years)", ylabel="predicted age (years)", xlim=line, ylim=line,
               title=what + ("" if r is None else f": r(gap, age) {shown(r, '+.2f')}"))
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{title}: test MAE {e['metrics']['mae']:.2f} years", fontsize=10)
    figs.save(fig, file)


def mae_bars(figs, file, bars, title, note=""):
    """Fig. 4's bars: groups male / female / all test scans, one bar per (label, colour, metrics) of bars."""
    series = [(label, [met[key] for key, _ in TEST_SETS], dict(color=colour)) for label, colour, met in bars]
    fig, ax, _ = grouped_bars(figs, [f"test: {t}" for _, t in TEST_SETS], series)
    top = max([0.0] + [v for _, values, _ in series for v in values if np.isfinite(v)])
    ax.set(ylabel="MAE (years)", title=title, ylim=(0, 1.35 * top or 1), xlabel=note)
    ax.legend(fontsize=7, loc="upper center", ncol=2)                 # in the headroom above the bars
    figs.save(fig, file)


def brain_age_figures(res, ensembles, folder, quiet=False):
    """brain-age --plots: a scatter per ensemble, Fig. 4A and 4B; absent runs: skipped, saying why."""
    figs, by = Figures(folder, quiet), {m["folder"]: m for m in res["models"]}
    for m in res["models"]:
        scatter_figure(figs, f"brain_age_scatter_{file_part(m['folder'])}.png", ensembles[m["folder"]],
                       f"{m['folder']} (Eq. 6 of v{', v'.join(map(str, m['versions']))})")
    bases = sorted({r["model"] for r in res["fig4a"]})
    if not bases:
        figs.skip("fig4a.png", "no runs trained on one sex (<model>-trainM, -trainF, -trainmixed: evaluate.py "
                  "protocol --task brain-age --train-sex M F mixed)")
    for base in bases:
        file = "fig4a.png" if len(bases) == 1 else f"fig4a_{file_part(base)}.png"
        have = {r["train"]: by[r["folder"]] for r in res["fig4a"] if r["model"] == base}
        if missing := [f"{base}-train{s}" for s, _, _ in FIG4A_BARS if s not in have]:
            figs.skip(file, f"Fig. 4A compares three training sets: no finished runs in {', '.join(missing)}")
        else:
            mae_bars(figs, file, [(label, colour, have[s]["metrics"]) for s, label, colour in FIG4A_BARS],
                     f"Fig. 4A: {base}, equal-size training sets")
    if missing := [f for f in ("imaging", "hyperfusion") if f not in by]:
        figs.skip("fig4b.png", f"Fig. 4B compares image-only and HyperFusion: no finished runs in {', '.join(missing)}")
    else:
        absent = [label for f, label, _ in FIG4B_BARS if f not in by]
        mae_bars(figs, "fig4b.png", [(label, colour, by[f]["metrics"]) for f, label, colour in FIG4B_BARS if f in by],
                 "Fig. 4B: trained on every subject", f"not trained: {', '.join(absent)}" if absent else "")
    return figs.summary


def sweep_figure(res, folder, quiet=False):
    """The sweep's mean probabilities and predicted fractions (AD) or mean ages (brain age) per value."""
    figs, rows = Figures(folder, quiet), res["summary"]
    x = np.arange(len(rows))
    fig, ax = figs.new(SMALL)
    if res["task"] == "ad":
        colours = figs.plt.get_cmap("tab10")
        for c, name in enumerate(h[len("mean P("):-1] for h in res["header"] if h.startswith("mean P(")):
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
    ax.set(xticks=x, xlabel=f"{res['attribute']} given to every test subject",
           title=f"{res['model']}: test-time sweep of {res['attribute']}")
    ax.set_xticklabels(["as recorded" if s["value"] is None else str(s["value"]) for s in rows], fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    figs.save(fig, f"sweep_{file_part(res['place'])}_{file_part(res['attribute'])}.png")   # one a run, not a model
    return figs.summary


# ---- Calibration (Guo et al. 2017): temperature scaling of every AD run, and the report before -> after ----
def calibration_report(paths, refit, device, batch_size, out_dir=None, plots_dir=None, quiet=False):
    """Every finished AD run under `paths`, its temperature fitted on its validation logits (predicted again for a
    run trained before, never retrained); its and each four-fold Eq. 7-8 ensemble's test ECE, class-wise ECE, Brier,
    NLL before -> after (after: every member at its own temperature, which also changes Eq. 8's weights), written to
    calibration_ad.{md,json} in out_dir (default: the first of `paths`) -> the dict."""
    dev, rows, out, groups, ensemble_rows = None, [], {"runs": [], "ensembles": []}, {}, []
    found, seen = [r for r in predict.find_runs(paths) if r.run.task == "ad"], {}
    name = lambda r: r.run_dir("").split(os.sep)[1]      # its model's folder: hyperfusion, hyperfusion-ce (App. C.4)
    for run in found:      # before any work: each fold of a four-fold ensemble once (two runs folders, a copied run)
        r = run.run
        other = seen.setdefault((name(r), r.split_seed, r.version, r.classes, r.fold), run.dir)
        if other != run.dir:
            raise UserError(f"{other} and {run.dir}: both hold fold {r.fold} of {name(r)} split seed {r.split_seed} "
                            f"v{r.version} (their best.pt says so), and a four-fold ensemble takes each fold once; "
                            f"calibrate them apart, or put a copied run back in its own folder")
    for run in found:
        outputs, r = read_logits(run.dir), run.run
        if outputs is None:
            dev, outputs = dev or setup_device(device), {}
            for part in ("val", "test"):        # both hippocampi apart, as the training run kept them
                _, table, idx, images = predict.test_set(run, part=part)
                outputs[part] = predict.run_outputs(run, run.model(dev), images, run.tabular.transform(
                    [table.raw[i] for i in idx]), table.labels[idx], dev, batch_size, None, sides=True)
            save_logits(run.dir, outputs["val"], outputs["test"])
        kept = run.temperature is not None and not refit
        rec = {**run.read_json(CALIBRATION_FILE), **calibration_change(outputs, run.temperature)} if kept else \
            calibrate(run.dir, outputs)      # kept: its figures at the temperature it holds now (set by hand?)
        if not quiet:
            print(f"{run.dir}: T {rec['temperature']:.3f}, validation ECE {rec['val']['before']['ece']:.3f} -> "
                  f"{rec['val']['after']['ece']:.3f}" + (" (kept)" if kept else ""))
        T = f"{rec['temperature']:.3f}" + " (fit at its lower bound: not used)" * bool(rec.get("warning"))
        change = lambda part, k: f"{fmt(rec[part]['before'][k])} → {fmt(rec[part]['after'][k])}"
        rows.append([name(r) + " (CN vs AD)" * (r.classes == 2), r.split_seed, r.version, r.fold, T,
                     change("val", "ece")] + [change("test", k) for _, k in CALIBRATION_COLUMNS])
        out["runs"].append({"dir": run.dir, **rec})
        groups.setdefault((name(r), r.split_seed, r.version, r.classes), []).append((run, rec, outputs))
    if not rows:
        raise UserError(f"{', '.join(map(str, paths))}: no finished AD run in or under it")
    groups = {key: sorted(g, key=lambda m: m[0].run.fold) for key, g in sorted(groups.items())
              if sorted(m[0].run.fold for m in g) == list(range(N_FOLDS))}   # 3-class and CN/AD runs apart
    figs = Figures(plots_dir, quiet) if plots_dir else None
    if figs is not None and not groups:                     # asked for: said, never left out without a word
        figs.skip("reliability_calibrated_*.png", "no model has its four folds of one split seed and version finished: "
                  "the diagrams are of the Eq. 7-8 ensembles of four folds")
    keys = ["balanced_accuracy", "auc_macro"] + [k for _, k in CALIBRATION_COLUMNS]
    for (model, seed, version, classes), members in groups.items():
        labels = members[0][2]["test"][1]
        check_same([read_run(m[0].dir) for m in members], "cannot ensemble {a} and {b}")    # one version of the data
        for run, _, outputs in members[1:]:
            if not np.array_equal(outputs["test"][1], labels):
                raise UserError(f"cannot ensemble {members[0][0].dir} and {run.dir}: their test labels differ")
        scaled = {t: [probabilities(o["test"][0], rec["temperature"] if t else 1.0) for _, rec, o in members]
                  for t in (False, True)}
        before, after = (entropy_weighted_ensemble(np.stack(scaled[t])) for t in (False, True))   # Eq. 7-8
        m0, m1 = (classification_metrics(labels, p, members[0][0].class_names) for p in (before, after))
        ensemble_rows.append([model + " (CN vs AD)" * (classes == 2), seed, version]
                             + [f"{fmt(m0[k])} → {fmt(m1[k])}" for k in keys])
        out["ensembles"].append({"model": model, "classes": classes, "split_seed": seed, "version": version,
                                 "members": [m[0].dir for m in members], "before": m0, "after": m1})
        if figs is not None:
            name = f"reliability_calibrated_{file_part(model)}{'_binary' * (classes == 2)}_seed{seed}_v{version}.png"
            reliability_figure(figs, name,
                               [("ensemble, uncalibrated", labels, before), ("ensemble, calibrated", labels, after)]
                               + [(f"fold {m[0].run.fold}", labels, p) for m, p in zip(members, scaled[True])],
                               f"{AD_MODEL_TITLES.get(model, model)}, split seed {seed}, v{version}: test set")
    if figs is not None:
        out["plots"] = figs.summary
    md = page("Calibration of the AD runs (temperature scaling, Guo et al. 2017)",
              f"Before → after; T fitted per run on its validation set (ECE val: where it was fitted), then the "
              f"test set ({len(rows)} runs).", (["model", "seed", "version", "fold", "T", "ECE val"]
                                                + [f"{n} test" for n, _ in CALIBRATION_COLUMNS], rows),
              *(["Eq. 7-8 ensembles of the four folds, test set, before → after (after: every member at its own "
                 "temperature, which changes Eq. 8's weights, so BA may move):", (["model", "seed", "version", "BA",
                 "AUC"] + [n for n, _ in CALIBRATION_COLUMNS], ensemble_rows)] if ensemble_rows else []))
    write_results(out, md, None, out_dir or (paths[0] if os.path.isdir(paths[0]) else os.path.dirname(paths[0])),
                  "calibration_ad", quiet)
    return out


# ---- Reading finished runs, refusing to combine what differs ----
def read_run(run_dir):
    """One finished run -> {"dir", "config", "metrics", "pred" (its test predictions, predictions.npz)}."""
    r = load_run(run_dir)
    return {"dir": run_dir, "config": r.config, "metrics": r.read_metrics(), "pred": r.read_predictions(),
            "place": r.run.run_dir("")}            # where its trainer put it: ad/<model>/seed<S>/v<V>/fold<F>, ...


def check_same(runs, why, keys=None):
    """Refuse runs trained on other data; with keys (an ensemble), other configs or test sets too."""
    for key, what in (("table_sha256", "tables"), ("images_sha256", "images")):   # in every checkpoint's `inputs`
        held = [r for r in runs if r["config"].get(key)]
        for other in held[1:]:
            a, b = held[0]["config"][key], other["config"][key]
            if a != b:
                raise UserError(why.format(a=held[0]["dir"], b=other["dir"]) + f": they were trained on different "
                                f"{what} ({key} {a[:12]}... vs {b[:12]}...: changed between their trainings?); "
                                f"train them again on the same data, or keep each version's runs in their own --runs")
    first = runs[0]
    for other in runs[1:] if keys else ():
        say = why.format(a=first["dir"], b=other["dir"]) + ": "
        for k in keys:
            if first["config"].get(k) != other["config"].get(k):
                raise UserError(say + f"{k} differs ({first['config'].get(k)!r} vs {other['config'].get(k)!r})")
        for k, what in (("subjects", "test subjects"), ("labels", "test labels"),
                        ("val_subjects", "validation subjects")):
            if k in first["pred"] and not np.array_equal(first["pred"][k], other["pred"].get(k)):
                raise UserError(say + f"their {what} differ")
    for r in runs if keys else ():        # a table names a run by its folder: one copied or moved there is refused
        if not os.path.abspath(r["dir"]).endswith(os.sep + r["place"]):
            raise UserError(f"{r['dir']}: holds the run of {r['place']} (its best.pt), not of this folder: copied or "
                            f"moved there? put it back in <runs>/{r['place']}, or train this folder's run")


def numbered(folder, prefix):
    """{number: path} of the sub-folders of `folder` named <prefix><number>, in order."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return dict(sorted((int(n[len(prefix):]), os.path.join(folder, n)) for n in names
                       if re.fullmatch(re.escape(prefix) + r"\d+", n) and os.path.isdir(os.path.join(folder, n))))


def page(title, *parts):
    """A results page in markdown: its title, then each part (a paragraph, or a table as (header, rows))."""
    return "\n\n".join([f"# {title}"] + [markdown_table(*p) if isinstance(p, tuple) else p for p in parts]) + "\n"


def write_results(res, markdown, table, out_dir, stem, quiet):
    """<stem>.md / .json / .csv (table: (header, rows), or None) in out_dir, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "json", "csv")[:3 if table else 2]]
    write_text(markdown, paths[0])
    write_json(res, paths[1])                                          # NaN -> null
    if table:
        write_csv(table[1], table[0], paths[2], for_people=True)       # a folder named =1+1 shows as text
    if not quiet:
        print(markdown + "\nwrote " + ", ".join(paths))


# ---- AD: Table 3 (Sec. 4.3.6-4.3.7) and late fusion (App. B) ----
def ensemble_ad_folds(fold_dirs):
    """The four fold models of one (split seed, version) on their shared test set, by Eq. 7-8."""
    runs = [read_run(d) for d in fold_dirs]
    check_same(runs, "cannot ensemble {a} and {b}", ("split_seed", "classes"))   # their own indicators (Sec. 3.3)
    first, members = runs[0], [r["pred"]["probs"] for r in runs]
    return {"subjects": first["pred"]["subjects"], "labels": first["pred"]["labels"], "config": first["config"],
            "dir": first["dir"], "probs": entropy_weighted_ensemble(np.stack(members)),     # (K, N, C) -> (N, C)
            "class_names": list(first["config"]["class_names"]), "members": members}


def evaluate_ad(runs, binary=False, out_dir=None, quiet=False, plots_dir=None):
    """The `ad` command, Table 3: per model a row per (split seed, version) with four finished folds, their Eq. 7-8
    ensemble, and late fusion (App. B); printed, written to results_ad.{md,csv,json}, its figures in plots_dir."""
    root, ensembles, incomplete = os.path.join(runs, "ad-binary" if binary else "ad"), {}, []
    for model in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for seed, seed_dir in numbered(os.path.join(root, model), "seed").items():
            for version, v_dir in numbered(seed_dir, "v").items():
                folds = [os.path.join(v_dir, f"fold{f}") for f in range(N_FOLDS)]
                done = [f for f in range(N_FOLDS) if finished(folds[f])]
                if len(done) == N_FOLDS:
                    ensembles.setdefault(model, {})[(seed, version)] = ensemble_ad_folds(folds)
                else:
                    incomplete.append(f"{model} seed {seed} v{version}: folds {done or 'none'} of 0-3 finished")
    if not ensembles:
        raise UserError(f"{root}: no model has four finished folds for any (split seed, version)"
                        + (f" ({'; '.join(incomplete)})" if incomplete else ""))
    check_same([e for ens in ensembles.values() for e in ens.values()], "cannot put {a} and {b} in one table")
    for key in sorted(set(ensembles.get("imaging", {})) & set(ensembles.get("tabular", {}))):  # App. B (no fold runs)
        a, b = ensembles["imaging"][key], ensembles["tabular"][key]
        if not np.array_equal(a["subjects"], b["subjects"]):    # their classes: checked with every model's below
            raise UserError(f"late fusion of split seed {key[0]} v{key[1]}: the imaging and tabular runs have "
                            f"different test subjects")
        ensembles.setdefault("late-fusion", {})[key] = dict(a, probs=(a["probs"] + b["probs"]) / 2, members=[])
    names = next(iter(next(iter(ensembles.values())).values()))["class_names"]
    for m, key, e in ((m, key, e) for m, ens in ensembles.items() for key, e in ens.items()):
        if e["class_names"] != names:
            raise UserError(f"{m} split seed {key[0]} v{key[1]}: classes {e['class_names']}, other runs have {names}")
    columns = ([("BA", "balanced_accuracy"), ("PRC", "precision"), ("F1", "f1_macro"), ("AUC", "auc_macro")]
               + [(f"TP-{c}", ("tp_rate", c)) for c in names] + list(CALIBRATION_COLUMNS))   # the last: not the paper's
    cols, ms = [t for t, _ in columns], []
    for m in [m for m in AD_ORDER if m in ensembles] + sorted(m for m in ensembles if m not in AD_ORDER):
        rows = []
        for (seed, version), e in sorted(ensembles[m].items()):
            met = classification_metrics(e["labels"], e["probs"], names)
            rows.append({"split_seed": seed, "version": version, "metrics": met, **{
                t: float(met[k[0]][k[1]] if isinstance(k, tuple) else met[k]) for t, k in columns}})
        summary = {t: mean_std([r[t] for r in rows]) for t in cols}
        ms.append({"model": m, "title": AD_MODEL_TITLES.get(m, m), "n_rows": len(rows), "rows": rows,
                   "mean": {t: s[0] for t, s in summary.items()}, "std": {t: s[1] for t, s in summary.items()},
                   "confusion_matrix": np.sum([r["metrics"]["confusion_matrix"] for r in rows], 0).tolist()})
    ref = next((x for x in ms if x["model"] == "hyperfusion"), None)          # the reference of the p-values
    for x in ms:
        x["p_value"] = {t: (mann_whitney_p([r[t] for r in x["rows"]], [r[t] for r in ref["rows"]])
                            if ref is not None and x is not ref else float("nan")) for t in cols}
    res = {"task": "ad-binary" if binary else "ad", "runs": os.path.abspath(runs), "class_names": names,
           "columns": cols, "paper_columns": cols[:-len(CALIBRATION_COLUMNS)], "reference": "hyperfusion",
           "models": ms, "incomplete": incomplete}
    md = page(TITLES[res["task"]], f"Runs: {res['runs']}. Each row of a model is the Eq. 7-8 ensemble of its four fold "
              f"models for one (split seed, version); mean +- std (ddof 1) over those rows.",
              (["model", "rows"] + cols, [[m["title"], m["n_rows"]] + [f"{fmt(m['mean'][t])} ± {fmt(m['std'][t])}"
                                          for t in cols] for m in ms]),
              f"Two-sided Mann-Whitney U p-value of each model's rows against {AD_MODEL_TITLES['hyperfusion']}'s:",
              (["model"] + cols, [[m["title"]] + [fmt_p(m["p_value"][t]) for t in cols] for m in ms if m is not ref]),
              "Confusion matrices summed over rows (rows: true class, columns: predicted):",
              *[part for m in ms for part in (f"**{m['title']}**", (["true \\ pred"] + names, [
                  [c] + row for c, row in zip(names, m["confusion_matrix"])]))],
              "Rows per (split seed, version):", (["model", "seed", "version"] + cols, [
                  [m["title"], r["split_seed"], r["version"]] + [fmt(r[t]) for t in cols] for m in ms
                  for r in m["rows"]]),
              *(["Left out (not all four folds finished): " + "; ".join(incomplete)] if incomplete else []))
    table = (["model", "rows"] + [f"{t} {s}" for t in cols for s in ("mean", "std", "p")] + ["confusion_matrix"],
             [[m["title"], m["n_rows"]] + [v for t in cols for v in (m["mean"][t], m["std"][t], m["p_value"][t])]
              + [json.dumps(m["confusion_matrix"])] for m in ms])
    write_results(res, md, table, out_dir or runs, f"results_{res['task']}", quiet)
    if plots_dir:
        res["plots"] = ad_figures(res, ensembles, plots_dir, quiet)
    return res


# ---- Brain age: Eq. 6 ensembles of the 5 best versions (Sec. 4.2.2), Fig. 4A, the brain-age gap ----
def brain_age_ensemble(version_dirs, top=5):
    """Eq. 6 over the `top` versions of lowest validation MAE (Sec. 4.2.2), with the age bias."""
    runs = {v: read_run(d) for v, d in version_dirs.items()}
    check_same(list(runs.values()), "cannot ensemble {a} and {b}")
    ranked = sorted(runs, key=lambda v: (runs[v]["metrics"]["val"]["mae"], v))[:top]
    chosen = [runs[v] for v in ranked]
    check_same(chosen, "cannot ensemble {a} and {b}", ("model", "split_seed", "split", "embedding_dim", "train_sex"))
    p = chosen[0]["pred"]
    pred = mean_ensemble([r["pred"]["pred"] for r in chosen])                         # Eq. 6
    gap = fit = None                  # the age bias and gap need every chosen version's validation predictions
    if all("val_pred" in r["pred"] for r in chosen):                          # on one set of subjects: check_same
        fit = age_bias_fit(p["val_age"], mean_ensemble([r["pred"]["val_pred"] for r in chosen]))
        gap = gap_summary(p["age"], pred, p["sex"], fit)
    return {"versions": ranked, "val_mae": [runs[v]["metrics"]["val"]["mae"] for v in ranked],
            "version_mae": {v: runs[v]["metrics"]["test"]["mae"] for v in sorted(runs)}, "available": sorted(runs),
            "metrics": regression_metrics(p["age"], pred, p["sex"]), "pred": pred, "age": p["age"], "sex": p["sex"],
            "subjects": p["subjects"], "gap": gap, "fit": fit, "dir": chosen[0]["dir"], "config": chosen[0]["config"]}


def evaluate_brain_age(runs, top=5, out_dir=None, quiet=False, plots_dir=None):
    """The `brain-age` command: per <runs>/brain-age folder its top-5 ensemble, paired against HyperFusion's, and
    Fig. 4A's table; printed, written to results_brain-age.{md,csv,json}, its figures in plots_dir."""
    root, ensembles, unfinished = os.path.join(runs, "brain-age"), {}, []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        versions = numbered(os.path.join(root, name), "v")
        unfinished += [f"{name} v{v}" for v, d in versions.items() if not finished(d)]    # said, as ad's incomplete
        if done := {v: d for v, d in versions.items() if finished(d)}:
            ensembles[name] = brain_age_ensemble(done, top)
    if not ensembles:
        raise UserError(f"{root}: no finished brain-age run")
    check_same(list(ensembles.values()), "cannot put {a} and {b} in one table")
    base, ms, fig4a = ensembles.get("hyperfusion"), [], []
    for name, e in ensembles.items():
        ms.append({"folder": name, **{k: e[k] for k in ("versions", "available", "val_mae", "version_mae", "metrics",
                                                         "gap")}, "vs_hyperfusion": None})
        if base and e is not base and list(e["subjects"]) == list(base["subjects"]):
            d = np.abs(e["pred"] - e["age"]) - np.abs(base["pred"] - base["age"])
            ms[-1]["vs_hyperfusion"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
        if match := FIG4A.fullmatch(name):
            fig4a.append({"model": match["base"], "train": match["sex"], "folder": name,
                          **{k: e["metrics"][key] for key, k in TEST_SETS}})
    fig4a.sort(key=lambda r: (r["model"], list(FIG4A_TRAIN).index(r["train"])))
    res = {"task": "brain-age", "runs": os.path.abspath(runs), "top": top, "models": ms, "fig4a": fig4a,
           "unfinished": unfinished}
    gaps, kept_all = [m for m in ms if m["gap"]], [m["folder"] for m in ms if len(m["available"]) <= top]
    keys = ("gap", "gap_male", "gap_female", "corrected_gap_male", "corrected_gap_female", "r_gap_age",
            "r_corrected_gap_age")
    md = page("Brain age (Sec. 4.2, Fig. 4)",
              f"Runs: {res['runs']}. Each row is the Eq. 6 ensemble of the {top} versions with the lowest validation "
              f"MAE (fewer when fewer exist); MAE in years on the test set; a model's MAE minus HyperFusion's is "
              f"paired over the same test scans.",
              (["model", "versions used", "MAE", "minus HyperFusion's (paired, ± SE)", "MAE male", "MAE female",
                "test MAE per version"],
               [[m["folder"], f"{', '.join(map(str, m['versions']))} of {len(m['available'])}",
                 f"{m['metrics']['mae']:.2f}",
                 "{mean:+.2f} ± {se:.2f}".format(**m["vs_hyperfusion"]) if m["vs_hyperfusion"] else "-",
                 f"{m['metrics']['mae_male']:.2f}", f"{m['metrics']['mae_female']:.2f}",
                 ", ".join(f"v{v} {mae:.2f}" for v, mae in m["version_mae"].items())] for m in ms]),
              *([f"All versions kept, none chosen by validation MAE (no more than {top} exist): "   # Sec. 4.2.2's
                 f"{', '.join(kept_all)}. Train more than {top} versions (evaluate.py protocol --versions) for "
                 f"Sec. 4.2.2's choice of the {top} best."] if kept_all else []),        # "5 best": among more
              *(["Brain-age gap (predicted minus chronological age) on the test set, mean in years; corrected: minus "
                 "the linear age bias fitted on the validation set (Smith et al. 2019); r: correlation with age:",
                 (["model", "gap", "gap male", "gap female", "corrected male", "corrected female", "r before",
                   "r after"], [[m["folder"]] + [shown(m["gap"][k], "+.2f") for k in keys] for m in gaps])]
                if gaps else []),
              *(["Fig. 4A: training set (rows) against test set (columns), ensemble MAE in years:",
                 (["model", "trained on"] + [f"test: {t}" for _, t in TEST_SETS],
                  [[r["model"], FIG4A_TRAIN[r["train"]]] + [f"{r[t]:.2f}" for _, t in TEST_SETS]
                   for r in fig4a])] if fig4a else []),
              *([f"Left out (not finished): {', '.join(unfinished)}"] if unfinished else []))
    table = (["model", "versions", "mae", "mae_male", "mae_female", "n"], [[m["folder"], " ".join(
        map(str, m["versions"]))] + [m["metrics"][k] for k in ("mae", "mae_male", "mae_female", "n")] for m in ms])
    write_results(res, md, table, out_dir or runs, "results_brain-age", quiet)
    if plots_dir:
        res["plots"] = brain_age_figures(res, ensembles, plots_dir, quiet)
    return res


# ---- Hyperlayer selection (Sec. 3.1.2, App. D) ----
def select_layers(task, data_csv=None, image_dir=None, data_dir="data", samples=8, draws=100, seed=0, verbose=False,
                  out=None):
    """Sec. 3.1.2: loss entropy of each candidate layer of the untrained backbone -> [(layer, entropy)]; `out`, the
    page's file, checked first: never over what it reads."""
    torch.manual_seed(seed)
    csv_path = data_csv or builtin_cohort(task, data_dir)
    table = data.read_ad_table(csv_path, image_dir) if task == "ad" else data.read_brain_age_table(csv_path, image_dir)
    if out:
        check_output("--out", out, [csv_path, data.crops_path(None, csv_path), *table.image_paths])
    groups = table.labels if task == "ad" else table.sex
    by_group = [list(np.flatnonzero(groups == c)) for c in np.unique(groups)]
    order = [idx[k] for k in range(len(groups)) for idx in by_group if k < len(idx)]      # the groups in turn
    if samples > len(order):                                  # not fewer than the page says
        raise UserError(f"--samples {samples}: {csv_path} has {len(order)} subjects")
    pick = np.array(sorted(order[:samples]))
    shape = data.check_image_geometry(table.image_paths, table.subjects)[0]   # as the trainers: one shape
    volumes = [data.load_volume(table.image_paths[i], table.subjects[i]) for i in pick]
    if task == "ad":
        crops = data.load_crops(None, csv_path)
        crops.check(shape, data.crops_path(None, csv_path) or "the default (MNI152) hippocampus boxes")
        image = np.stack([crops(v)[0] for v in volumes])
        tabular = TabularPreprocessor().fit(table.raw).transform([table.raw[i] for i in pick])
        model = build_model("ad", "imaging", n_tabular=tabular.shape[1], n_classes=3)
        target, loss_fn = torch.as_tensor(table.labels[pick]), F.cross_entropy
    else:
        image, tabular = np.stack([data.BRAIN_ZSCORE(v) for v in volumes]), data.sex_onehot(table.sex[pick])   # as fed
        target = torch.as_tensor(AgeTarget(float(table.age.mean())).encode(table.age[pick]))  # cohort: no split yet
        model = build_model("brain-age", "imaging", image_shape=image.shape[1:])
        loss_fn = lambda pred, y: F.mse_loss(pred.float(), y)                    # Eq. 4
    batch = (torch.as_tensor(image, dtype=torch.float32)[:, None], torch.as_tensor(tabular), target)
    if verbose:                 # every draw is one forward pass of the whole network
        print(f"{len(candidate_layers(model))} candidate layers x {draws} draws, {len(pick)} subjects of {csv_path}",
              flush=True)
    shown = Progress("loss entropy", len(candidate_layers(model)) * draws, "draws", not verbose)   # AD: ~10 min
    scores = layer_loss_entropy(model, batch, loss_fn, n_draws=draws, seed=seed, on_draw=shown.advance)
    shown.finish()
    return scores


# ---- The protocol runner (Sec. 4.2.2, 4.3.6): every missing run trained, K at a time, then the table ----
@dataclass
class Job:
    """One training run, its script in a process of its own (evaluate.py protocol --jobs K)."""
    run_dir: str
    command: list                  # [python, script, options...]
    after: str = None              # run_dir of a job that must finish first (HyperFusion: its tabular-only MLP)
    label: str = None              # how its progress line names it (None: run_dir)


def gpu_masks(gpus, visible_count, environ=None):
    """--gpus indices among the GPUs this process sees -> each slot's CUDA_VISIBLE_DEVICES."""
    mask = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    seen = ([g.strip() for g in mask.split(",") if g.strip()] if mask is not None
            else [str(i) for i in range(visible_count)])[:visible_count]
    if bad := [g for g in gpus if not 0 <= g < len(seen)]:
        where = f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else ""
        raise UserError(f"--gpus {','.join(map(str, gpus))}: " + (f"GPU {bad[0]} does not exist here: {len(seen)} "
                        f"visible{where}, indices 0 to {len(seen) - 1}" if seen else f"no GPU is visible here{where}"))
    return [seen[g] for g in gpus]


def start(job, slot, k, gpus):
    """-> (process, output file) of one of k jobs: its share of the cores, with gpus its slot's GPU."""
    env = dict(os.environ, LOCAL_WORLD_SIZE=str(k))
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // k)))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
    out = tempfile.TemporaryFile()
    return subprocess.Popen(job.command + ["--device", "cuda"] * bool(gpus), stdout=out, stderr=subprocess.STDOUT,
                            env=env), out


def run_jobs(jobs, k, gpus=None, poll_s=0.2, quiet=False):
    """Every job, k at a time, each after its `after` -> run dirs; a failure raises, an interrupt ends every run."""
    waiting, done, failed, running, slots = list(jobs), [], None, {}, list(range(k))
    every = {j.run_dir for j in jobs}
    shown = Progress("train", len(jobs), "runs", quiet, parallel=k)
    try:
        while running or (waiting and failed is None):    # after a failure: only until the running ones end
            ready = [j for j in waiting if j.after not in every.difference(done)]  # `after`: done, or not one of these
            while failed is None and slots and ready:
                job, slot = ready.pop(0), slots.pop(0)
                waiting.remove(job)
                running[job.run_dir] = (job, slot, *start(job, slot, k, gpus), time.time())
                shown.say(f"started{f' on GPU {gpus[slot % len(gpus)]}' if gpus else ''}: {job.run_dir}")
            time.sleep(poll_s)
            for job, slot, proc, out, started in [r for r in running.values() if r[2].poll() is not None]:
                del running[job.run_dir]
                slots.append(slot)
                out.seek(0)
                last = (out.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                out.close()
                if proc.returncode != 0:
                    failed = failed or f"{job.run_dir}: training failed (exit {proc.returncode}): {last or 'no output'}"
                    continue
                done.append(job.run_dir)
                now = time.time()
                shown.item_done(now - started, job.label or job.run_dir,
                                f": {last.replace(f' -> {job.run_dir}', '')}" if last else "",
                                spent=sum(now - r[4] for r in running.values()))
    except BaseException:
        procs = [r[2] for r in running.values()]
        for proc in procs:
            proc.terminate()          # last.pt stays intact: the run resumes
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    if failed is not None:
        raise UserError(failed)
    return done


def check_protocol_data(finished_dirs, task, data_csv=None, image_dir=None, data_dir="data", cache_dir=None):
    """Refuse finished runs trained on other data than the missing runs would: one result, one data."""
    mixed = ("; training the missing runs would mix two versions of the data in one result: restore the data, or "
             "train them all again into another --runs folder")
    now, fingerprints = None, {}
    for r in map(load_run, finished_dirs):
        held = r.inputs.get("table_sha256")
        if not held:            # a run from before runs were tied to their data
            continue
        if now is None:
            csv_path = data_csv or builtin_cohort(task, data_dir)
            now = data.table_sha256(csv_path)
        if held != now:
            raise UserError(f"{r.dir} was trained on another version of {csv_path} (table sha256 {held[:12]}..., now "
                            f"{now[:12]}...: edited since?)" + mixed)
        if r.inputs.get("images_sha256"):
            key = (r.run.classes, json.dumps(r.run.group_map, sort_keys=True))   # the rows, so the images, it read
            if key not in fingerprints:
                table = (data.read_ad_table(csv_path, image_dir, classes=r.run.classes, group_map=r.run.group_map)
                         if task == "ad" else data.read_brain_age_table(csv_path, image_dir))
                fingerprints[key] = data.image_fingerprint(table.image_paths, data.cache_folder(cache_dir, csv_path),
                                                           table.subjects)
            if fingerprints[key] != r.inputs["images_sha256"]:
                raise UserError(f"{r.dir} was trained on other images than {csv_path} names now (images_sha256 "
                                f"{r.inputs['images_sha256'][:12]}..., now {fingerprints[key][:12]}...: replaced or "
                                f"re-preprocessed since?)" + mixed)


def run_protocol(task, runs="runs", split_seeds=(0,), versions=None, models=None, epochs=None, data_csv=None,
                 image_dir=None, data_dir="data", binary=False, train_sex=("all",), embedding_dim=1, verbose=False,
                 tabular_epochs=None, jobs=None, gpus=None, print_commands=False, quiet=False, cache_dir=None,
                 compile=False):
    """Train every missing run (resuming), `jobs` at a time (default: one a GPU of `gpus`, else 1), then the table
    -> (trained, skipped, results)."""
    t0, known, script = time.time(), *((AD_MODELS, train_ad) if task == "ad" else (BRAIN_AGE_MODELS, train_brain_age))
    jobs = len(gpus or [0]) if jobs is None else jobs     # --gpus 0,1 alone: GPU 1 was left idle
    check_number("--jobs", jobs, least=1)
    if task == "brain-age" and len(split_seeds) != 1:
        raise UserError("brain-age runs are not kept per split seed (runs/brain-age/<model>/v<V>): give one "
                        "--split-seeds value")
    other = {"--binary": binary, "--tabular-epochs": tabular_epochs} if task == "brain-age" else {
        "--train-sex": list(train_sex) != ["all"], "--embedding-dim": embedding_dim != 1}   # never ignored unsaid
    if given := [o for o, v in other.items() if v]:
        raise UserError(f"{given[0]}: an option of the {'AD' if task == 'brain-age' else 'brain-age'} runs, not of "
                        f"--task {task}'s; leave it out")
    if print_commands and (gpus or jobs > 1):      # printed, not run: a scheduler gives each command its GPU
        option = f"--gpus {','.join(map(str, gpus))}" if gpus else f"--jobs {jobs}"
        raise UserError(f"{option} with --print-commands: the commands are printed, not run here, so no GPU or "
                        f"process is given to them; leave {option.split()[0]} out, or train here without "
                        f"--print-commands")
    if bad := [m for m in models or () if m not in known]:
        raise UserError(f"--models {bad[0]}: not {'an AD' if task == 'ad' else 'a brain-age'} model (one of "
                        f"{', '.join(known)})")
    common = (["--out", runs, "--data-dir", data_dir] + (["--data-csv", data_csv] if data_csv else [])
              + (["--image-dir", image_dir] if image_dir else []) + (["--cache-dir", cache_dir] if cache_dir else [])
              + ([] if verbose else ["--quiet"]) + ["--compile"] * compile)
    vs = versions if versions is not None else (0,) if task == "ad" else range(5)
    if tabular_epochs and task == "ad" and "hyperfusion" in (models or ()):   # else it trains its MLPs at --epochs
        models = ["tabular", *models]
    where = ([(s, v, f, None) for s in split_seeds for v in vs for f in range(N_FOLDS)] if task == "ad"
             else [(split_seeds[0], v, None, sex) for sex in train_sex for v in vs])
    todo = []        # (run dir, argv, run dir to wait for: HyperFusion's tabular-only MLP)
    for model, (s, v, f, sex) in ((m, w) for m in dict.fromkeys(models or known) for w in dict.fromkeys(where)):
        n = tabular_epochs if model == "tabular" and tabular_epochs else epochs
        run_dir = brain_age_run_dir(runs, model, v, embedding_dim, sex) if sex else ad_run_dir(runs, model, s, v, f,
                                                                                               binary)
        argv = (["--model", model, "--split-seed", str(s), "--version", str(v)] + (["--epochs", str(n)] if n else [])
                + (["--embedding-dim", str(embedding_dim), "--train-sex", sex] if sex else ["--fold", str(f)])
                + (["--classes", "2"] if binary and not sex else []) + common
                + ["--resume"] * os.path.isfile(os.path.join(run_dir, "last.pt")))      # an interrupted run resumes
        todo.append((run_dir, argv,
                     ad_run_dir(runs, "tabular", s, v, f, binary) if model == "hyperfusion" and not sex else None))
    skipped = [d for d, _, _ in todo if finished(d)]
    todo = [job for job in todo if job[0] not in skipped]
    if skipped and todo:    # before anything trains: the finished runs must be of the data the others would train on
        check_protocol_data(skipped, task, data_csv, image_dir, data_dir, cache_dir)
    if print_commands:      # the tabular-only MLPs first: HyperFusion's embedding starts from them (Sec. 4.3.6)
        commands = [shlex.join(["python", os.path.basename(script.__file__)] + argv)
                    for _, argv, _ in sorted(todo, key=lambda j: j[1][1] != "tabular")]
        for command in commands:
            print(command, flush=True)
        return commands, skipped, None
    shown = Progress("train", len(todo), "runs", quiet)
    for d in skipped:
        shown.say(f"skipped (finished): {d}")
    label = lambda run_dir: " ".join(os.path.relpath(run_dir, runs).split(os.sep))     # ad hyperfusion seed0 v0 fold2
    trained, parallel = [], jobs > 1 or gpus    # --gpus with --jobs 1: one run at a time, each in a process on its GPU
    for run_dir, argv, _ in () if parallel else todo:
        shown.say(f"{'resuming' if '--resume' in argv else 'training'}: {run_dir}")
        with shown.hushed():
            t1 = time.time()
            script.main(argv)
        trained.append(run_dir)
        shown.item_done(time.time() - t1, label(run_dir))
    if parallel and todo:   # without --gpus, every GPU this process sees, in turn (not all on GPU 0)
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        masks = gpu_masks(gpus or range(visible), visible) if gpus or visible else None
        trained = run_jobs([Job(d, [sys.executable, script.__file__] + argv, after, label(d))
                            for d, argv, after in todo], jobs, masks, quiet=quiet)
    shown.say(f"protocol: {len(trained)} trained, {len(skipped)} skipped, {duration_text(time.time() - t0)}")
    res = evaluate_ad(runs, binary) if task == "ad" else evaluate_brain_age(runs)
    shown.say(f"total wall time {duration_text(time.time() - t0)}")
    return trained, skipped, res


# ---- Command line ----
def gpu_indices(text):
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices separated by commas, e.g. 0,1") from None


COMMANDS = {"ad": "Table 3 from <runs>/ad (or ad-binary): ensembles of the four folds",
            "brain-age": "MAE of the 5-best ensembles (Eq. 6) and Fig. 4A from <runs>/brain-age",
            "select-layers": "Sec. 3.1.2: loss entropy of every candidate layer, sorted",
            "sweep": "the test set read with one tabular attribute set to each value in turn",
            "calibrate": "temperature scaling of every AD run under RUNS, and its report",
            "protocol": "train every missing run of the protocol, then print the table"}
OPTIONS = (   # (the sub-commands that take it, the option, its argparse keywords)
    ("ad protocol", "--binary", dict(action="store_true", help="CN vs AD runs (App. B), <runs>/ad-binary")),
    ("brain-age", "--top", dict(type=int, default=5, help="versions per ensemble, lowest validation MAE first")),
    ("ad brain-age protocol", "--runs", dict(default="runs")),
    ("ad brain-age select-layers calibrate", "--out", dict(help="results folder (select-layers: a markdown file)")),
    ("select-layers protocol", "--task", dict(required=True, choices=["ad", "brain-age"])),
    ("select-layers", "--samples", dict(type=int, default=8, help="subjects in the fixed batch")),
    ("select-layers", "--draws", dict(type=int, default=100, help="re-initialisations per layer")),
    ("select-layers", "--seed", dict(type=int, default=0)),
    ("sweep", "checkpoint", dict(help="a run folder, or its best.pt")),
    ("sweep", "--attribute", dict(required=True, help="AD: AGE, PTGENDER, ABETA, ...; brain age: Sex")),
    ("sweep", "--values", dict(required=True, nargs="+")),
    ("calibrate", "runs", dict(nargs="+", metavar="RUNS", help="finished AD run folders, or folders above them")),
    ("calibrate", "--refit", dict(action="store_true", help="fit every temperature again from the kept logits")),
    ("sweep calibrate", "--batch-size", dict(type=int, default=16)),
    ("sweep calibrate", "--device", dict(default="auto", choices=["auto", "cpu", "cuda"])),
    ("ad brain-age sweep calibrate", "--plots", dict(metavar="DIR", help="also draw the figures as PNG files in DIR")),
    ("protocol", "--split-seeds", dict(type=int, nargs="+", default=[0])),
    ("protocol", "--versions", dict(type=int, nargs="+", help="default: 0 (AD), 0 1 2 3 4 (brain age)")),
    ("protocol", "--models", dict(nargs="+", help="default: every model of the task")),
    ("protocol", "--epochs", dict(type=int, help="default: the training scripts' (Table 1, or the demo schedule)")),
    ("protocol", "--tabular-epochs", dict(type=int, help="AD: epochs of the tabular-only MLP (default --epochs)")),
    ("protocol", "--train-sex", dict(nargs="+", default=["all"], choices=["all", "M", "F", "mixed"])),   # Fig. 4A
    ("protocol", "--embedding-dim", dict(type=int, default=1, choices=[1, 2], help="brain age: sex embedding size")),
    ("protocol", "--verbose", dict(action="store_true", help="the training scripts' per-epoch lines (--jobs 1)")),
    ("protocol", "--jobs", dict(type=int, help="runs at a time, each in its own process (1: in this one); default: "
                                               "one a --gpus index, else 1")),
    ("protocol", "--gpus", dict(type=gpu_indices, help="e.g. 0,1,2,3")),
    ("protocol", "--print-commands", dict(action="store_true", help="train nothing: print a command per run")),
    ("protocol", "--cache-dir", dict(help="decoded-image cache (default: <csv folder>/cache)")),
    ("protocol", "--compile", dict(action="store_true", help="train every run with --compile (for long runs)")),
    ("select-layers sweep protocol", "--data-csv", dict(help="default: the synthetic cohort (sweep: the run's)")),
    ("select-layers sweep protocol", "--image-dir", {}),
    ("select-layers protocol", "--data-dir", dict(default="data", help="where the synthetic cohort is generated")),
    ("select-layers calibrate protocol", "--quiet", dict(action="store_true", help="no progress lines")),
)


def main(argv=None):
    p = ArgumentParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=text) for name, text in COMMANDS.items()}
    for names, option, keywords in OPTIONS:
        for name in names.split():
            parsers[name].add_argument(option, **keywords)
    a = p.parse_args(sys.argv[1:] if argv is None else [str(v) for v in argv])
    for option, least in (("top", 1), ("samples", 2), ("draws", 2), ("seed", 0), ("batch_size", 1),
                          ("split_seeds", 0), ("versions", 0), ("epochs", 1), ("tabular_epochs", 1)):
        check_number("--" + option.replace("_", "-"), getattr(a, option, None), least=least,
                     most=2 ** 31 - 1 if option in ("split_seeds", "versions", "seed") else None)   # the trainers'
    if getattr(a, "plots", None):      # before any work: without matplotlib nothing is computed, nothing written
        check_plots_folder(a.plots)
    option, out = ("--runs", a.runs) if a.command == "protocol" else ("--out", getattr(a, "out", None))
    if a.command != "select-layers" and out:                     # select-layers' --out: a file
        check_folder(option, out, "the results")
    if a.command == "ad":
        return evaluate_ad(a.runs, a.binary, a.out, plots_dir=a.plots)
    if a.command == "brain-age":
        return evaluate_brain_age(a.runs, a.top, a.out, plots_dir=a.plots)
    if a.command == "protocol":
        return run_protocol(**{k: v for k, v in vars(a).items() if k != "command"})
    if a.command == "calibrate":
        return calibration_report(a.runs, a.refit, a.device, a.batch_size, a.out, a.plots, a.quiet)
    if a.command == "select-layers":
        t0 = time.time()
        scores = select_layers(a.task, a.data_csv, a.image_dir, a.data_dir, a.samples, a.draws, a.seed, not a.quiet,
                               a.out)
        md = page(f"Loss entropy per layer (Sec. 3.1.2), {a.task}: image-only backbone, untrained, {a.samples} "
                  f"subjects, {a.draws} draws", (["rank", "layer", "entropy"], [
                      [k + 1, n, f"{max(0.0, h):.3f}"] for k, (n, h) in enumerate(scores)]))   # not -0.0
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)   # as predict.py's --out
            write_text(md, a.out)
        print(md + (f"\nwrote {a.out}" if a.out else "") + ("" if a.quiet else "\n" + duration_text(time.time() - t0)))
        return scores
    res = predict.sweep(a.checkpoint, a.attribute, a.values, a.data_csv, a.image_dir, a.batch_size, a.device)
    what = "class probabilities" if res["task"] == "ad" else "predicted brain age in years"
    md = page(f"{res['model']}: {what} on the test set as {res['attribute']} varies", f"Checkpoint: "
              f"{res['checkpoint']}. Every test subject is read once per value (Sec. 1: the model is adjusted at "
              f"test time).", (res["header"], res["rows"]))
    path = os.path.join(res["dir"], f"sweep_{res['attribute']}.md")
    write_text(md, path)
    print(f"{md}\nwrote {path}")
    if a.plots:
        res["plots"] = sweep_figure(res, a.plots)
    return res


if __name__ == "__main__":
    run_cli(main)
