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
import argparse
import json
import os
import re
import runpy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import calibration
import data
import plots
import predict
from metrics import (CALIBRATION_COLUMNS, age_bias_fit, classification_metrics, entropy_weighted_ensemble, fmt, fmt_p,
                     gap_summary, mann_whitney_p, markdown_table, mean_ensemble, mean_std, regression_metrics)
from models import AD_MODEL_TITLES, AgeTarget, build_model, candidate_layers, layer_loss_entropy
from runs import finished, load_run
from safeio import (ArgumentParser, UserError, check_number, check_output, duration_text, run_cli, write_csv,
                    write_json, write_text)
from synthetic import builtin_cohort
from tabular import TabularPreprocessor

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
        res["plots"] = plots.ad_figures(res, ensembles, plots_dir, quiet)
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
        res["plots"] = plots.brain_age_figures(res, ensembles, plots_dir, quiet)
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
                   help="calibration.py: temperature scaling of every AD run under RUNS, and its report (its options)")
    sub.add_parser("run-protocol", add_help=False,
                   help="protocol.py: train every missing run of the protocol, then print the table (its options)")
    for sp in (a, b):
        sp.add_argument("--runs", default="runs")
    s.add_argument("--data-csv", help="default: the built-in synthetic cohort")
    s.add_argument("--image-dir")
    s.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run-protocol"]:   # the old command: protocol.py run as its own script (it imports this file)
        sys.argv = [os.path.join(HERE, "protocol.py"), *argv[1:]]
        return runpy.run_path(sys.argv[0], run_name="__main__")
    if argv[:1] == ["calibrate"]:
        return calibration.main(argv[1:])
    a = arguments().parse_args(argv)
    for option, least in (("top", 1), ("samples", 2), ("draws", 1), ("seed", 0), ("batch_size", 1)):
        check_number("--" + option.replace("_", "-"), getattr(a, option, None), least=least)
    if getattr(a, "plots", None):      # before any work: without matplotlib nothing is computed, nothing written
        plots.check_plots_folder(a.plots)
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
            res["plots"] = plots.sweep_figure(res, a.plots)
        return res


if __name__ == "__main__":
    run_cli(main)
