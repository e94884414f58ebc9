"""The metrics (Eq. 9-10), the calibration of probabilities, the ensembles (Eq. 6-8; Sec. 3.4, 4.3.6) and the
statistics over a table's rows (Sec. 4.3.7): training, evaluation and prediction all compute a number here."""
import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, f1_score, log_loss, precision_score, roc_auc_score

CALIBRATION_BINS = 15   # equal-width confidence bins of the expected calibration error (Guo et al. 2017)
CALIBRATION_COLUMNS = [("ECE", "ece"), ("cwECE", "ece_classwise"), ("Brier", "brier"), ("NLL", "nll")]  # tables


def _mean(v):
    return float(v.mean()) if len(v) else float("nan")


def classification_metrics(labels, probs, class_names):
    """labels (N,), probs (N, C) -> Sec. 4.3.6's metrics (AUC NaN when a class is absent), and calibration."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(class_names):   # a column too many would be counted as no class
        raise ValueError(f"probabilities of shape {probs.shape} for {len(class_names)} classes {tuple(class_names)}")
    n_classes, pred, every = len(class_names), probs.argmax(1), list(range(len(class_names)))
    cm = confusion_matrix(labels, pred, labels=every)            # rows: true class, columns: predicted class
    with np.errstate(invalid="ignore", divide="ignore"):
        tp_rate = np.diag(cm) / cm.sum(1)
    auc = float("nan")
    if len(np.unique(labels)) == n_classes > 1:
        auc = (roc_auc_score(labels, probs[:, 1]) if n_classes == 2 else
               roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=every))
    return {
        "balanced_accuracy": float(np.nanmean(tp_rate)),                                                  # Eq. 9
        "precision": float(precision_score(labels, pred, labels=every, average="macro", zero_division=0)),  # Eq. 10
        "f1_macro": float(f1_score(labels, pred, labels=every, average="macro", zero_division=0)),
        "auc_macro": float(auc),
        "tp_rate": {c: float(r) for c, r in zip(class_names, tp_rate)},
        "confusion_matrix": cm.tolist(),
        "n": int(len(labels)),
        **calibration_metrics(labels, probs),
    }


def reliability(hit, confidence, n_bins=CALIBRATION_BINS):
    """Per non-empty equal-width confidence bin: (observed frequency of `hit`, mean confidence, count)."""
    hit, confidence = np.asarray(hit, float), np.asarray(confidence, float)
    observed, predicted = calibration_curve(hit, confidence, n_bins=n_bins, strategy="uniform", pos_label=1)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], confidence), minlength=n_bins)
    return observed, predicted, counts[counts > 0]


def expected_calibration_error(hit, confidence):
    """sum over bins of (share of the predictions in the bin) x |observed frequency - mean confidence|."""
    observed, predicted, counts = reliability(hit, confidence)
    return float((counts / counts.sum() * np.abs(observed - predicted)).sum())


def calibration_metrics(labels, probs):
    """labels (N,), probs (N, C) -> top-label ECE (Guo et al. 2017), one-vs-rest ECE averaged over classes (it shows
    a class rarely on top), multi-class Brier score (0 best, 2 worst), NLL."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    classes = range(probs.shape[1])
    onehot = labels[:, None] == np.arange(probs.shape[1])
    return {
        "ece": expected_calibration_error(probs.argmax(1) == labels, probs.max(1)),
        "ece_classwise": float(np.mean([expected_calibration_error(onehot[:, c], probs[:, c]) for c in classes])),
        "brier": float(sum(brier_score_loss(onehot[:, c], probs[:, c], pos_label=True) for c in classes)),
        "nll": float(log_loss(labels, probs / probs.sum(1, keepdims=True), labels=list(classes))),  # float32 sums
    }


def regression_metrics(target, pred, sex):
    """Brain age (Sec. 4.2.2): MAE overall, on males (sex 0) and on females (sex 1)."""
    target, pred, sex = np.asarray(target, float), np.asarray(pred, float), np.asarray(sex)
    err = np.abs(pred - target)
    return {"mae": _mean(err), "mae_male": _mean(err[sex == 0]), "mae_female": _mean(err[sex == 1]), "n": len(err)}


def age_bias_fit(age, pred):
    """The brain-age gap regressed on age (its linear age bias; Smith et al. 2019) -> {"intercept", "slope", "n"}."""
    age, gap = np.asarray(age, float), np.asarray(pred, float) - np.asarray(age, float)
    slope, intercept = np.polyfit(age, gap, 1) if len(age) > 1 and np.ptp(age) > 0 else (0.0, float(gap.mean()))
    return {"intercept": float(intercept), "slope": float(slope), "n": int(len(age))}


def corrected_gap(age, pred, fit):
    """The brain-age gap with the age bias (regression to the mean, age_bias_fit) removed."""
    age = np.asarray(age, float)
    return np.asarray(pred, float) - age - (fit["intercept"] + fit["slope"] * age)


def gap_summary(age, pred, sex, fit):
    """Mean gap and bias-corrected gap, overall and by sex, and the correlation of each with age."""
    age, sex = np.asarray(age, float), np.asarray(sex)
    raw, corr = np.asarray(pred, float) - age, corrected_gap(age, pred, fit)
    r = lambda v: float(np.corrcoef(v, age)[0, 1]) if len(v) > 2 and np.ptp(age) > 0 and np.ptp(v) > 0 else np.nan
    out = {"r_gap_age": r(raw), "r_corrected_gap_age": r(corr)}
    for name, m in (("", np.ones(len(age), bool)), ("_male", sex == 0), ("_female", sex == 1)):
        out[f"gap{name}"], out[f"corrected_gap{name}"] = _mean(raw[m]), _mean(corr[m])
    return out


def mean_ensemble(preds):
    """Eq. 6: the plain average of K regressors' predictions, (K, B) -> (B,)."""
    return np.asarray(preds, dtype=np.float64).mean(0)


def entropy(p, axis=-1, eps=1e-12):
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.clip(p, eps, 1.0))).sum(axis)


def entropy_weighted_ensemble(probs, eps=1e-12):
    """Eq. 7-8: a confident (low-entropy) member weighs more, per sample. probs (K, B, C) -> (B, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    inv_h = 1.0 / np.maximum(entropy(probs), eps)          # (K, B)
    alpha = inv_h / inv_h.sum(0, keepdims=True)            # Eq. 8
    return (alpha[..., None] * probs).sum(0)               # Eq. 7


def mean_std(values):
    """Mean and sample standard deviation (ddof 1) of the finite values; std NaN below 2 values."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    return _mean(v), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def mann_whitney_p(x, y):
    """Two-sided Mann-Whitney U p-value of two samples of rows (Sec. 4.3.7); NaN below 2 finite values each."""
    x, y = [v for v in x if np.isfinite(v)], [v for v in y if np.isfinite(v)]
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue) if min(len(x), len(y)) > 1 else float("nan")


def fmt_p(p):
    """A p-value as Table 3's footnotes print it: p<0.001, p<0.01, else two decimals; '-' for NaN."""
    return "-" if p is None or not np.isfinite(p) else "p<0.001" if p < 0.001 else "p<0.01" if p < 0.01 else f"{p:.2f}"


def fmt(v, digits=3):
    """.673 style (as Table 3) for values in [0, 1]; '-' for NaN."""
    s = "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"
    return s.replace("0.", ".", 1) if s.lstrip("-").startswith("0.") else s


def shown(v, spec, why=""):
    """A figure as `spec` formats it, or `undefined (why)` where no subject defines it (a sex or class absent)."""
    return format(v, spec) if np.isfinite(v) else "undefined" + (f" ({why})" if why else "")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
