"""The AD tabular record (Sec. 3.3, 4.3.3): attribute names, cell parsing, preprocessing fitted on training rows.

Attributes use ADNIMERGE's column names. A cell is a number, empty or ADNI's code -4 / -1 (missing), or
a censored CSF value such as `>1700` / `<8` (read as the assay limit); a value outside what the
attribute can hold (ATTRIBUTE_RANGES) is refused. TabularPreprocessor turns raw rows into the
model's input: one-hot sex, z-scores, iterative imputation (Sec. 3.3) and missing indicators;
its state is plain numbers, saved in every checkpoint so a run predicts exactly as it trained.
"""
import json
import math
import warnings

import numpy as np
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (makes IterativeImputer importable)
from sklearn.impute import IterativeImputer

from safeio import UserError

AD_ATTRIBUTES = ("AGE", "PTGENDER", "PTEDUCAT", "APOE4", "ABETA", "PTAU", "TAU", "FDG", "AV45")
AD_CONTINUOUS = tuple(a for a in AD_ATTRIBUTES if a != "PTGENDER")  # 8 attributes, z-scored
SEX_CODES = {"male": 0, "m": 0, "female": 1, "f": 1}  # 0 = male, 1 = female everywhere


def parse_value(text):
    """Tabular cell -> float. Empty = NaN (missing); ADNIMERGE censored '>1700' -> 1700.0, '<8' -> 8.0.

    Raises ValueError on anything else (callers add the row and column to the message).
    """
    s = text.strip() if text is not None else ""
    if s == "" or s.upper() in ("NA", "NAN"):
        return math.nan
    if s[0] in "<>":
        s = s[1:].strip()
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(s)
    return v


# What an attribute can hold: (lowest, highest) and whether it counts (APOE4: copies of the e4 allele).
# The biomarkers (CSF pg/mL, PET SUVR) cannot be negative; beyond 1e6 is a unit or export error.
ATTRIBUTE_RANGES = {"AGE": (0, 120, False), "PTEDUCAT": (0, 40, False), "APOE4": (0, 2, True),
                    **{a: (0, 1e6, False) for a in ("ABETA", "PTAU", "TAU", "FDG", "AV45")}}
MISSING_CODES = (-4.0, -1.0)   # ADNI: -4 "not applicable / not collected", -1 "missing"


def is_missing_code(text):
    """True for ADNI's missing-value codes -4 and -1 (as '-4', '-1', '-4.0', ...) in an attribute cell."""
    try:
        return float(str(text or "").strip()) in MISSING_CODES
    except ValueError:
        return False


def parse_attribute(col, text, checked=True):
    """An AD attribute cell -> float: ADNI's -4 / -1 read as missing (NaN), else parse_value; if `checked`,
    the value must be one `col` can hold (ATTRIBUTE_RANGES: where tables and options come in; the
    preprocessor, fed rows already read, only parses). Raises ValueError saying what is wrong (callers
    add the row and column)."""
    if is_missing_code(text):
        return math.nan
    try:
        v = parse_value(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    lo, hi, count = ATTRIBUTE_RANGES[col]
    if checked and not math.isnan(v):
        if v < lo or v > hi or (count and v != int(v)):
            what = f"one of {', '.join(str(k) for k in range(int(lo), int(hi) + 1))}" if count else f"{lo:g} to {hi:g}"
            kind = "negative" if v < 0 else "impossible"
            raise ValueError(f"{kind} value {text.strip()!r} (expected {what})")
    return v


# ----------------------------------------------------------------------------------------------
# Preprocessing (Sec. 3.3)

class TabularPreprocessor:
    """AD tabular attributes -> float32 features, fitted on training rows only.

    Output columns, in order: PTGENDER one-hot (Male, Female); the 8 other attributes z-scored
    with the training mean/std (APOE4 as a number); then one 0/1 indicator per attribute that
    had missing values in the training rows. Missing values, sex included, are imputed by iterative
    imputation (Sec. 3.3: each column regressed on the others, in turns) over the 8 z-scored
    attributes and sex as 0 (male) / 1 (female); an imputed sex s in [0, 1] becomes (1 - s, s).

    The imputer is fitted with scikit-learn's IterativeImputer (BayesianRidge, its default,
    deterministic: sample_posterior=False), as in the paper and DAFT. What transform needs is
    then copied out as plain numbers: the initial column means and, for every step of every
    round, (column, neighbour columns, coefficients, intercept). transform replays those steps
    in numpy, exactly as IterativeImputer.transform does, so state_dict() is JSON/torch-safe
    and no pickled sklearn object goes into a checkpoint.
    """

    def __init__(self, max_iter=10, state=None):
        self.max_iter = max_iter
        self.state = None
        if state is not None:
            self.load_state_dict(state)

    @classmethod
    def from_state_dict(cls, state):
        return cls(state=state)

    @staticmethod
    def parse(raw_rows):
        """raw rows (dicts of cell text) -> sex (N,) float (NaN if missing), X (N, 8) float64 with NaN."""
        n = len(raw_rows)
        sex = np.full(n, np.nan)
        X = np.full((n, len(AD_CONTINUOUS)), np.nan)
        for i, row in enumerate(raw_rows):
            s = str(row.get("PTGENDER", "") or "").strip().lower()
            if s and not is_missing_code(s):
                if s not in SEX_CODES:
                    raise UserError(f"tabular row {i + 1}: column PTGENDER: expected Male or Female, got {s!r}")
                sex[i] = SEX_CODES[s]
            for j, col in enumerate(AD_CONTINUOUS):
                try:
                    X[i, j] = parse_attribute(col, str(row.get(col, "") or ""), checked=False)
                except ValueError as exc:
                    raise UserError(f"tabular row {i + 1}: column {col}: {exc}") from None
        return sex, X

    def fit(self, raw_rows):
        sex, X = self.parse(raw_rows)
        if len(X) < 2:
            raise UserError("tabular preprocessing needs at least 2 training rows")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'Mean of empty slice' for a column missing in every row
            mean, std = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
        mean = np.where(np.isnan(mean), 0.0, mean)
        std = np.where(~np.isfinite(std) | (std < 1e-12), 1.0, std)
        Z = np.concatenate([(X - mean) / std, sex[:, None]], 1)                  # (N, 8 + 1): attributes, sex
        missing = np.isnan(Z)
        steps, init = [], np.zeros(Z.shape[1])
        if missing.any():
            imp = IterativeImputer(max_iter=self.max_iter, random_state=0, keep_empty_features=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning when max_iter rounds are reached
                imp.fit(Z)
            init = imp.initial_imputer_.statistics_
            for t in imp.imputation_sequence_:
                steps.append({"feat": int(t.feat_idx), "neighbors": [int(k) for k in t.neighbor_feat_idx],
                              "coef": [float(c) for c in t.estimator.coef_],
                              "intercept": float(t.estimator.intercept_)})
        imputed = list(AD_CONTINUOUS) + ["PTGENDER"]
        indicators = [imputed[j] for j in range(Z.shape[1]) if missing[:, j].any()]
        self.state = {
            "version": 2, "attributes": list(AD_CONTINUOUS), "imputed": imputed,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "init": [float(v) for v in init], "steps": steps, "indicators": indicators,
        }
        return self

    @property
    def columns(self):
        s = self._state()
        return ["PTGENDER_Male", "PTGENDER_Female"] + list(s["attributes"]) + [f"{a}_missing" for a in s["indicators"]]

    @property
    def n_features(self):
        return len(self.columns)

    def _state(self):
        if self.state is None:
            raise RuntimeError("TabularPreprocessor is not fitted; call fit() or load_state_dict()")
        return self.state

    def transform(self, raw_rows):
        """raw rows -> (N, n_features) float32, no NaN. Each row is transformed on its own."""
        s = self._state()
        sex, X = self.parse(raw_rows)
        Z = np.concatenate([(X - np.array(s["mean"])) / np.array(s["std"]), sex[:, None]], 1)   # (N, 9)
        missing = np.isnan(Z)
        Z = np.where(missing, np.array(s["init"])[None, :], Z)                    # initial (mean) fill
        if missing.any():                                                         # as IterativeImputer
            for st in s["steps"]:
                rows = missing[:, st["feat"]]
                if rows.any():
                    Z[rows, st["feat"]] = Z[rows][:, st["neighbors"]] @ np.array(st["coef"]) + st["intercept"]
        female = np.clip(Z[:, -1], 0.0, 1.0)                                      # imputed sex in [0, 1]
        onehot = np.stack([1.0 - female, female], 1)
        ind = np.stack([missing[:, s["imputed"].index(a)] for a in s["indicators"]], 1) \
            if s["indicators"] else np.zeros((len(sex), 0))
        return np.concatenate([onehot, Z[:, :-1], ind.astype(np.float64)], 1).astype(np.float32)

    def fit_transform(self, raw_rows):
        return self.fit(raw_rows).transform(raw_rows)

    def state_dict(self):
        return json.loads(json.dumps(self._state()))  # a deep copy of plain numbers, lists and str

    def load_state_dict(self, state):
        if not isinstance(state, dict) or state.get("version") != 2 or "steps" not in state:
            raise UserError("tabular preprocessor state is not a version-2 TabularPreprocessor state "
                            "(written by an older version of this code?)")
        self.state = json.loads(json.dumps(state))
        return self
