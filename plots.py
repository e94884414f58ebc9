"""The figures as PNG files: Table 3 and Fig. 4 drawn, confusion matrices, ROC and learning curves, sweeps; and the
one way this project writes a PNG (matplotlib when installed, else a standard-library encoder for the previews).

    evaluate.py ad --plots DIR         confusion_<model>_seed<S>_v<V>.png, roc_<...>.png, reliability_<...>.png
                                       per row of Table 3, table3.png (its columns as bars per model: mean +- std,
                                       the rows as points), learning_curves_<model>.png (--binary: names end _binary)
    evaluate.py brain-age --plots DIR  brain_age_scatter_<folder>.png per ensemble, fig4a.png, fig4b.png,
                                       brain_age_gap_by_sex.png, learning_curves_<folder>.png
    evaluate.py sweep ... --plots DIR  sweep_<model>_<attribute>.png
    evaluate.py calibrate --plots DIR  reliability_calibrated_<model>_seed<S>_v<V>.png (before and after)
    data.py check-ad ... --preview DIR the previews, through write_png

matplotlib is optional (requirements.txt does not list it): it is imported inside the functions that draw, never
at the top, so that importing this module, and the previews, work without it. Without it `--plots` is refused
before any other work (check_plots_folder), in one line. Every file is written atomically (safeio.atomic_path).
A figure whose runs are absent is not drawn: one line says which and why.
"""
import csv
import os
import re
import struct
import sys
import zlib

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from metrics import CALIBRATION_BINS, age_bias_fit, corrected_gap, expected_calibration_error, fmt, reliability
from safeio import UserError, atomic_path, write_bytes

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

def matplotlib_or_none():
    """The matplotlib package on the non-interactive Agg backend, or None when it is not installed.

    Imported here, not at the top of the file, only because matplotlib is an optional dependency (not a way
    around an import circle): the rest of the project, this module included, must import without it."""
    try:
        import matplotlib
    except ImportError:
        return None
    if "matplotlib.pyplot" not in sys.modules:    # before pyplot: no display, no window, the same PNGs everywhere
        matplotlib.use("Agg")                       # (after it, switching would close a notebook's open figures)
    return matplotlib


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

def png_bytes(rgb):
    """(H, W, 3) uint8 -> the bytes of an RGB PNG, with the standard library's zlib (the fallback writer)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))                 # filter 0 on every row
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(rgb, path):
    """(H, W, 3) uint8 -> a PNG of W x H pixels, atomically: matplotlib's imsave when installed, else png_bytes."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    mpl = matplotlib_or_none()
    if mpl is None:
        write_bytes(png_bytes(rgb), path)
        return
    import matplotlib.image                  # deferred: optional, as in matplotlib_or_none
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, rgb, format="png")


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
    as bars; a learning-curve figure per model. res: evaluate.ad_results; ensembles: {model: {(seed, version):
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
    figure per folder. res: evaluate.brain_age_results; ensembles: {folder: its Eq. 6 ensemble (age, pred, sex,
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
