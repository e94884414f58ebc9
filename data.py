"""
Data for HyperFusion: synthetic cohorts, loading of real tables and NIfTI images, tabular
preprocessing (Sec. 3.3, 4.3.3), splits (Sec. 4.2.3, 4.3.4, App. C.1), hippocampus crops
(Sec. 3.5.2), a decode-once image cache, and the torch Datasets the training scripts use.

On-disk format (the same for synthetic and real data, so the real loading path is the one
the demos exercise):
    AD:        ad.csv with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4, ABETA, PTAU, TAU,
               FDG, AV45 (ADNIMERGE names) and optionally `image` (path relative to the CSV);
               else images/<Subject>.nii.gz; crops.json with the hippocampus boxes.
    brain age: brain_age.csv with Subject, Age, Sex (M/F) [, image]; images as above.

Command line (bad input -> one line `error: ...` on stderr, exit status 2):
    python data.py synth-ad --out DIR [--n N] [--seed S]
    python data.py synth-brain-age --out DIR [--n N] [--seed S]
    python data.py check-ad CSV [--image-dir DIR] [--no-images]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
"""

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
import zlib
from dataclasses import dataclass

import numpy as np
import torch

CLASS_NAMES = ("CN", "MCI", "AD")
GROUP_ALIASES = {"CN": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI", "AD": "AD", "DEMENTIA": "AD"}
AD_ATTRIBUTES = ("AGE", "PTGENDER", "PTEDUCAT", "APOE4", "ABETA", "PTAU", "TAU", "FDG", "AV45")
AD_CONTINUOUS = tuple(a for a in AD_ATTRIBUTES if a != "PTGENDER")  # 8 attributes, z-scored
SEX_CODES = {"male": 0, "m": 0, "female": 1, "f": 1}  # 0 = male, 1 = female everywhere

# -----------------------------------------------------------------------------
# errors and safe writing


class DataError(ValueError):
    """Bad input data. The message is one line naming the file / subject / row / column."""


def cli_error(exc):
    """Print `error: <one line>` on stderr and exit with status 2 (no traceback)."""
    if isinstance(exc, OSError) and not isinstance(exc, DataError) and exc.filename:
        msg = f"{exc.filename}: {exc.strerror or exc}"
    else:
        msg = str(exc)
    print("error: " + " ".join(msg.split()), file=sys.stderr)
    sys.exit(2)


def run_cli(main, argv=None):
    """Run `main(argv)`, turning DataError / OSError into cli_error (for every script's __main__)."""
    try:
        return main(argv)
    except (DataError, OSError) as exc:
        cli_error(exc)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; os.replace it onto `path` on success, delete on error.

    The temporary name ends with the final basename, so extension-sniffing writers (nibabel's
    `.nii.gz`, np.save's `.npy`) behave as for the real name. Readers never see a partial file.
    """
    path = os.fspath(path)
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex[:12]}-{base}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _save_json(obj, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def _save_nifti(volume, spacing, path):
    """Write a float32 volume with a RAS affine of isotropic `spacing` mm, centred on the origin."""
    import nibabel as nib
    shape = np.array(volume.shape[:3])
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (shape - 1) / 2  # world (0,0,0) at the volume centre
    img = nib.Nifti1Image(volume.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)

# -----------------------------------------------------------------------------
# reading NIfTI volumes, with validation


def _where(path, subject=None):
    return f"{path} (subject {subject})" if subject is not None else f"{path}"


def load_nifti(path, subject=None, canonical=True):
    """Load and validate one NIfTI -> nibabel image holding float32 3D data (RAS if canonical).

    Errors (DataError naming the file and subject): missing, unreadable, truncated or corrupt
    gzip, not 3D (trailing singleton dimensions are squeezed; the shape is checked from the
    header, before decoding), NaN or inf voxels.
    """
    import nibabel as nib
    where = _where(path, subject)
    if not os.path.isfile(path):
        raise DataError(f"{where}: image file not found")
    try:
        img = nib.load(path)
    except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise DataError(f"{where}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{where}: expected a 3D image, got shape {tuple(img.shape)}")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # short gzip stream, bad CRC, short file
        raise DataError(f"{where}: truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{where}: {bad} NaN/inf voxels")
    out = nib.Nifti1Image(data, img.affine)
    return nib.as_closest_canonical(out) if canonical else out


def load_volume(path, subject=None, expected_shape=None):
    """Validated float32 (X, Y, Z) array in RAS orientation (see load_nifti)."""
    data = np.asarray(load_nifti(path, subject).dataobj, dtype=np.float32)
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        raise DataError(f"{_where(path, subject)}: image shape {tuple(data.shape)}, expected {tuple(expected_shape)}")
    return data

# -----------------------------------------------------------------------------
# reading tables


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


def _read_csv(csv_path, required):
    """-> (list of (line number, row dict), fieldnames). Checks columns, field counts and encoding."""
    if not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: table not found")
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            for row in reader:
                if None in row:
                    raise DataError(f"{csv_path} line {reader.line_num}: {len(fields) + len(row[None])} fields, "
                                    f"the header has {len(fields)}")
                row = {k: (v or "").strip() for k, v in row.items()}  # short rows: absent cells are empty
                if any(row.values()):                                  # skip blank lines
                    rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: not a readable UTF-8 CSV table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(f"{csv_path}: no data rows")
    return rows, fields


def _image_paths(csv_path, rows, fields, subjects, image_dir, need):
    """Image path per subject: the `image` column (relative to the CSV) or <image_dir>/<Subject>.nii.gz."""
    if not need:
        return None
    base = os.path.dirname(os.path.abspath(csv_path))
    image_dir = image_dir if image_dir is not None else os.path.join(base, "images")
    paths = []
    for (line, row), subj in zip(rows, subjects):
        if "image" in fields and row.get("image"):
            p = os.path.join(base, row["image"])
        else:
            p = os.path.join(image_dir, f"{subj}.nii.gz")
        if not os.path.isfile(p):
            raise DataError(f"{csv_path} line {line}: subject {subj}: image file not found: {p}")
        paths.append(p)
    return paths


def _subjects(csv_path, rows):
    subjects, seen = [], {}
    for line, row in rows:
        s = row.get("Subject", "")
        if not s:
            raise DataError(f"{csv_path} line {line}: empty Subject")
        if s in seen:
            raise DataError(f"{csv_path} line {line}: subject {s} repeats line {seen[s]}")
        seen[s] = line
        subjects.append(s)
    return subjects


def _number(csv_path, line, row, col, required):
    try:
        v = parse_value(row.get(col, ""))
    except ValueError:
        raise DataError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}: "
                        f"not a number: {row.get(col)!r}") from None
    if required and math.isnan(v):
        raise DataError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col} is empty")
    if col in ("AGE", "Age") and not 0 <= v <= 120:
        raise DataError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}: "
                        f"implausible age {row.get(col)!r}")
    return v


@dataclass
class ADTable:
    """The AD cohort as read from the CSV. `raw` rows feed TabularPreprocessor."""
    subjects: list
    labels: np.ndarray      # (N,) int64, index into CLASS_NAMES (classes=2: CN=0, AD=1)
    raw: list               # (N,) dicts attribute -> cell text, for AD_ATTRIBUTES
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female
    age: np.ndarray         # (N,) float32
    image_paths: list       # (N,) str, or None when need_images=False
    csv_path: str
    class_names: tuple = CLASS_NAMES


def read_ad_table(csv_path, image_dir=None, need_images=True, classes=3):
    """Read and validate an ADNIMERGE-like AD table (SPEC Sec. 3, paper Sec. 4.3.1, 4.3.3).

    Line numbers in errors are CSV line numbers (the header is line 1).
    """
    if classes not in (2, 3):
        raise DataError(f"classes must be 2 (CN vs AD) or 3, got {classes}")
    rows, fields = _read_csv(csv_path, ("Subject", "Group") + AD_ATTRIBUTES)
    keep, labels, sexes, ages = [], [], [], []
    for line, row in rows:
        g = GROUP_ALIASES.get(row["Group"].upper())
        if g is None:
            raise DataError(f"{csv_path} line {line}: subject {row['Subject']}: column Group: unknown diagnosis "
                            f"{row['Group']!r} (expected CN, MCI, EMCI, LMCI, AD or Dementia)")
        sx = SEX_CODES.get(row["PTGENDER"].lower())
        if sx is None:
            raise DataError(f"{csv_path} line {line}: subject {row['Subject']}: column PTGENDER: "
                            f"expected Male or Female, got {row['PTGENDER']!r}")
        age = _number(csv_path, line, row, "AGE", required=True)
        for col in AD_CONTINUOUS[1:]:
            _number(csv_path, line, row, col, required=False)  # validate now, parse in the preprocessor
        if classes == 2 and g == "MCI":
            continue
        keep.append((line, row))
        labels.append(CLASS_NAMES.index(g) if classes == 3 else int(g == "AD"))
        sexes.append(sx)
        ages.append(age)
    if not keep:
        raise DataError(f"{csv_path}: no CN or AD subjects")
    subjects = _subjects(csv_path, keep)
    paths = _image_paths(csv_path, keep, fields, subjects, image_dir, need_images)
    raw = [{a: row[a] for a in AD_ATTRIBUTES} for _, row in keep]
    names = CLASS_NAMES if classes == 3 else ("CN", "AD")
    return ADTable(subjects, np.array(labels, np.int64), raw, np.array(sexes, np.int64),
                   np.array(ages, np.float32), paths, os.fspath(csv_path), names)


@dataclass
class BrainAgeTable:
    subjects: list
    age: np.ndarray         # (N,) float32, years
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female
    image_paths: list       # (N,) str, or None
    csv_path: str


def read_brain_age_table(csv_path, image_dir=None, need_images=True):
    """Read and validate a brain-age table: Subject, Age, Sex (M/F) [, image] (Sec. 4.2.1)."""
    rows, fields = _read_csv(csv_path, ("Subject", "Age", "Sex"))
    ages, sexes = [], []
    for line, row in rows:
        ages.append(_number(csv_path, line, row, "Age", required=True))
        sx = SEX_CODES.get(row["Sex"].lower())
        if sx is None:
            raise DataError(f"{csv_path} line {line}: subject {row['Subject']}: column Sex: "
                            f"expected M or F, got {row['Sex']!r}")
        sexes.append(sx)
    subjects = _subjects(csv_path, rows)
    paths = _image_paths(csv_path, rows, fields, subjects, image_dir, need_images)
    return BrainAgeTable(subjects, np.array(ages, np.float32), np.array(sexes, np.int64), paths, os.fspath(csv_path))


def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    sex = np.asarray(sex, np.int64)
    return np.eye(2, dtype=np.float32)[sex]

# -----------------------------------------------------------------------------
# tabular preprocessing (Sec. 3.3, 4.3.3)


class TabularPreprocessor:
    """AD tabular attributes -> float32 features, fitted on training rows only.

    Output columns, in order: PTGENDER one-hot (Male, Female); the 8 other attributes z-scored
    with the training mean/std (APOE4 as a number); then one 0/1 indicator per attribute that
    had missing values in the training rows. Missing values are imputed in z-score space by
    iterative imputation (Sec. 3.3: each column regressed on the others, in turns).

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
            if s:
                if s not in SEX_CODES:
                    raise DataError(f"tabular row {i + 1}: column PTGENDER: expected Male or Female, got {s!r}")
                sex[i] = SEX_CODES[s]
            for j, col in enumerate(AD_CONTINUOUS):
                try:
                    X[i, j] = parse_value(str(row.get(col, "") or ""))
                except ValueError:
                    raise DataError(f"tabular row {i + 1}: column {col}: not a number: {row.get(col)!r}") from None
        return sex, X

    def fit(self, raw_rows):
        from sklearn.experimental import enable_iterative_imputer  # noqa: F401
        from sklearn.impute import IterativeImputer
        import warnings
        _, X = self.parse(raw_rows)
        if len(X) < 2:
            raise DataError("tabular preprocessing needs at least 2 training rows")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'Mean of empty slice' for a column missing in every row
            mean, std = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
        mean = np.where(np.isnan(mean), 0.0, mean)
        std = np.where(~np.isfinite(std) | (std < 1e-12), 1.0, std)
        Z = (X - mean) / std
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
        indicators = [AD_CONTINUOUS[j] for j in range(Z.shape[1]) if missing[:, j].any()]
        self.state = {
            "version": 1, "attributes": list(AD_CONTINUOUS),
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
        """raw rows -> (N, n_features) float32, no NaN."""
        s = self._state()
        sex, X = self.parse(raw_rows)
        Z = (X - np.array(s["mean"])) / np.array(s["std"])                         # (N, 8)
        missing = np.isnan(Z)
        Z = np.where(missing, np.array(s["init"])[None, :], Z)                    # initial (mean) fill
        if missing.any() and not missing.all():                                   # as IterativeImputer
            for st in s["steps"]:
                rows = missing[:, st["feat"]]
                if rows.any():
                    Z[rows, st["feat"]] = Z[rows][:, st["neighbors"]] @ np.array(st["coef"]) + st["intercept"]
        onehot = np.zeros((len(sex), 2))
        ok = ~np.isnan(sex)
        onehot[ok, sex[ok].astype(int)] = 1.0                                    # missing sex -> (0, 0)
        ind = np.stack([missing[:, s["attributes"].index(a)] for a in s["indicators"]], 1) \
            if s["indicators"] else np.zeros((len(sex), 0))
        return np.concatenate([onehot, Z, ind.astype(np.float64)], 1).astype(np.float32)

    def fit_transform(self, raw_rows):
        return self.fit(raw_rows).transform(raw_rows)

    def state_dict(self):
        return json.loads(json.dumps(self._state()))  # a deep copy of plain numbers, lists and str

    def load_state_dict(self, state):
        if not isinstance(state, dict) or state.get("version") != 1 or "steps" not in state:
            raise DataError("tabular preprocessor state is not a version-1 TabularPreprocessor state")
        self.state = json.loads(json.dumps(state))
        return self

# -----------------------------------------------------------------------------
# splits (Sec. 4.3.4, App. C.1; Sec. 4.2.3)


def _bins(age, n_bins):
    age = np.asarray(age, np.float64)
    edges = np.linspace(age.min(), age.max(), n_bins + 1)[1:-1]
    return np.digitize(age, edges)


def _stratified_order(keys, seed):
    """Shuffle with the seed, then group by the stratification keys (random order within a group)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(keys[0]))
    order = np.lexsort(tuple(np.asarray(k)[perm] for k in reversed(keys)))  # stable: keeps perm inside groups
    return perm[order]


def ad_split(sex, labels, age, seed, n_subsets=5, n_age_bins=20):
    """-> (N,) int64 subset id 0..n_subsets-1 per subject (Sec. 4.3.4).

    Shuffled with `seed`, then dealt round-robin into the subsets within each (sex, diagnosis,
    age bin) group; the dealing position carries over from one group to the next, so the
    subsets differ in size by at most one and keep the joint distribution.
    """
    n = len(labels)
    if n < n_subsets:
        raise DataError(f"{n} subjects cannot be split into {n_subsets} subsets")
    order = _stratified_order([sex, labels, _bins(age, n_age_bins)], seed)
    subsets = np.empty(n, np.int64)
    subsets[order] = np.arange(n) % n_subsets
    return subsets


def ad_fold(subsets, fold, test_subset=4):
    """-> (train_idx, val_idx, test_idx): test = subset 4, validation = subset `fold` (0..3), train = rest."""
    subsets = np.asarray(subsets)
    n_sub = int(subsets.max()) + 1
    if not (0 <= fold < n_sub) or fold == test_subset:
        raise DataError(f"fold must be in 0..{n_sub - 2} (subset {test_subset} is the test set), got {fold}")
    idx = np.arange(len(subsets))
    return (idx[(subsets != fold) & (subsets != test_subset)], idx[subsets == fold], idx[subsets == test_subset])


def brain_age_split(age, sex, seed, fractions=(0.8, 0.1, 0.1), n_age_bins=20):
    """-> (train_idx, val_idx, test_idx), 80/10/10 stratified by sex and age bins (Sec. 4.2.3).

    Same dealing as ad_split, but by quotas: the next subject goes to the part furthest below
    its share so far, so every (sex, age bin) group is cut in the given fractions.
    """
    fr = np.asarray(fractions, np.float64)
    if len(age) < len(fr) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise DataError(f"cannot split {len(age)} subjects into fractions {tuple(fractions)}")
    order = _stratified_order([sex, _bins(age, n_age_bins)], seed)
    counts = np.zeros(len(fr))
    part = np.empty(len(order), np.int64)
    for k, i in enumerate(order):
        j = int(np.argmax(fr * (k + 1) - counts))
        part[i] = j
        counts[j] += 1
    return tuple(np.flatnonzero(part == j) for j in range(len(fr)))

# -----------------------------------------------------------------------------
# hippocampus crops (Sec. 3.5.2)


@dataclass
class HippocampusCrops:
    """Two boxes around the hippocampi of a RAS volume (axis 0 runs left -> right).

    __call__(volume (X, Y, Z)) -> (2, D, H, W): [left box, right box flipped along axis 0], so
    both look like a left hippocampus. Starts are voxel corners, size is (D, H, W).
    """
    left_start: tuple
    right_start: tuple
    size: tuple

    def __post_init__(self):
        self.left_start, self.right_start, self.size = (tuple(int(v) for v in t)
                                                        for t in (self.left_start, self.right_start, self.size))

    @classmethod
    def mni152_1mm(cls):
        """Approximate 64x96x64 boxes (the paper's crop size) for a 1 mm MNI152 182x218x182 RAS volume.

        Centred on the hippocampi at about MNI (x=-/+26, y=-22, z=-14) mm, i.e. voxels (64|116, 104, 58).
        Check them on your own registration before use.
        """
        return cls((32, 56, 26), (84, 56, 26), (64, 96, 64))

    def check(self, shape, where="volume"):
        for name, st in (("left", self.left_start), ("right", self.right_start)):
            if any(s < 0 or s + d > n for s, d, n in zip(st, self.size, shape)):
                raise DataError(f"{where}: {name} hippocampus box start {st} size {self.size} "
                                f"does not fit in image shape {tuple(shape)}")

    def __call__(self, volume):
        self.check(volume.shape)
        l, r, s = self.left_start, self.right_start, self.size
        left = volume[l[0]:l[0] + s[0], l[1]:l[1] + s[1], l[2]:l[2] + s[2]]
        right = volume[r[0]:r[0] + s[0], r[1]:r[1] + s[1], r[2]:r[2] + s[2]][::-1]
        return np.stack([left, right])                                             # (2, D, H, W)

    def cache_key(self):
        return f"crops{self.left_start}{self.right_start}{self.size}"

    def save(self, path):
        _save_json({"left_start": list(self.left_start), "right_start": list(self.right_start),
                    "size": list(self.size)}, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
            return cls(d["left_start"], d["right_start"], d["size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: not a crops file ({type(exc).__name__}: {exc})") from None

# -----------------------------------------------------------------------------
# decode-once image cache


class ImageCache:
    """NIfTI decoded once into `cache_dir/<subject>-<config>-<stamp>.npy`, then served memory-mapped.

    config hashes the source path, the dtype and the transform's cache_key() (or repr); stamp
    hashes the source's mtime and size. An edited source or a different transform is never
    served stale; a re-decode replaces the entry it supersedes, other configs are kept.
    Items are read-only memmaps: memory is bounded by what the batches touch, not by the cohort.
    Every image is validated on decode (see load_nifti) and, if given, against expected_shape.
    """

    def __init__(self, paths, cache_dir, dtype="float16", transform=None, expected_shape=None, names=None):
        if dtype not in ("float16", "float32"):
            raise DataError(f"cache dtype must be float16 or float32, got {dtype!r}")
        self.paths = [os.path.abspath(p) for p in paths]
        self.names = list(names) if names is not None else [os.path.basename(p).split(".")[0] for p in paths]
        self.cache_dir, self.dtype, self.transform = cache_dir, dtype, transform
        self.expected_shape = expected_shape
        self.n_decoded = 0  # decodes done by this object (tests check the cache is used)
        os.makedirs(cache_dir, exist_ok=True)

    def __len__(self):
        return len(self.paths)

    def entry(self, i):
        """Cache file `<subject>-<config hash>-<source stamp hash>.npy` of item i."""
        st = os.stat(self.paths[i]) if os.path.exists(self.paths[i]) else None
        t = self.transform
        tkey = "" if t is None else (t.cache_key() if hasattr(t, "cache_key") else repr(t))
        conf = hashlib.sha1(f"{self.paths[i]}|{self.dtype}|{tkey}".encode()).hexdigest()[:10]
        stamp = hashlib.sha1(f"{st.st_mtime_ns if st else 0}|{st.st_size if st else 0}".encode()).hexdigest()[:10]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.names[i])[:64]
        return os.path.join(self.cache_dir, f"{safe}-{conf}-{stamp}.npy")

    def _decode(self, i, out):
        vol = load_volume(self.paths[i], self.names[i], self.expected_shape)
        if self.transform is not None:
            vol = self.transform(vol)
        arr = np.ascontiguousarray(vol, dtype=self.dtype)
        if not np.isfinite(arr).all():
            raise DataError(f"{self.paths[i]} (subject {self.names[i]}): values overflow {self.dtype}; use float32")
        prefix = os.path.basename(out)[:-len("0123456789.npy")]   # same subject and config, older source
        for old in os.listdir(self.cache_dir):
            if old.startswith(prefix) and old.endswith(".npy") and len(old) == len(prefix) + 14:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.cache_dir, old))
        with atomic_path(out) as tmp:
            np.save(tmp, arr)
        self.n_decoded += 1

    def __getitem__(self, i):
        out = self.entry(i)
        if not os.path.exists(out):
            self._decode(i, out)
        return np.load(out, mmap_mode="r")

    def prepare(self, progress=True):
        """Decode every missing entry now, printing progress (count, time left) when there are many."""
        todo = [i for i in range(len(self)) if not os.path.exists(self.entry(i))]
        t0, last = time.time(), 0.0
        for k, i in enumerate(todo):
            self._decode(i, self.entry(i))
            now = time.time()
            if progress and len(todo) >= 50 and (now - last > 5 or k + 1 == len(todo)):
                left = (now - t0) / (k + 1) * (len(todo) - k - 1)
                print(f"cache {self.cache_dir}: {k + 1}/{len(todo)} decoded, {left:.0f} s left", flush=True)
                last = now
        return self

# -----------------------------------------------------------------------------
# datasets


class ADDataset(torch.utils.data.Dataset):
    """(image, tabular, target) for AD classification (Sec. 3.5.2, 4.3.6).

    images[i]: a (X, Y, Z) volume (cropped here with `crops`) or an already cropped (2, D, H, W)
    pair. Training: one side drawn per sample with torch.randint (seeded by torch / the
    DataLoader worker), image (1, D, H, W). Evaluation: both sides, image (2, 1, D, H, W).
    """

    def __init__(self, images, tabular, labels, crops=None, train=True):
        assert len(images) == len(tabular) == len(labels)
        self.images, self.crops, self.train = images, crops, train
        self.tabular = torch.as_tensor(np.asarray(tabular, np.float32))
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        vol = self.images[i]
        if vol.ndim == 3 and self.crops is None:
            raise DataError(f"item {i}: a whole volume {tuple(vol.shape)} needs `crops` "
                            "(or a cache with the crops as transform)")
        pair = self.crops(vol) if vol.ndim == 3 else vol                           # (2, D, H, W)
        if self.train:
            side = int(torch.randint(2, (1,)))
            img = torch.from_numpy(np.array(pair[side], np.float32))[None]        # (1, D, H, W)
        else:
            img = torch.from_numpy(np.array(pair, np.float32))[:, None]           # (2, 1, D, H, W)
        return img, self.tabular[i], self.labels[i]


class BrainAgeDataset(torch.utils.data.Dataset):
    """(image (1, D, H, W), sex one-hot (2,), age scalar float32) for brain age (Sec. 3.5.1)."""

    def __init__(self, images, sex_onehot, age):
        assert len(images) == len(sex_onehot) == len(age)
        self.images = images
        self.tabular = torch.as_tensor(np.asarray(sex_onehot, np.float32))
        self.age = torch.as_tensor(np.asarray(age, np.float32))

    def __len__(self):
        return len(self.age)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i], np.float32))[None], self.tabular[i], self.age[i]


class TabularDataset(torch.utils.data.Dataset):
    """(empty image, tabular, target) for the tabular-only model, so the training loop is shared."""

    def __init__(self, tabular, labels):
        self.tabular = torch.as_tensor(np.asarray(tabular, np.float32))
        self.labels = torch.as_tensor(np.asarray(labels))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(0), self.tabular[i], self.labels[i]

# -----------------------------------------------------------------------------
# synthetic cohorts (SPEC Sec. 4): same on-disk format as real data
#
# Generative model. Every image is a skull-stripped, brain-like volume: an ellipsoidal brain
# with an outer CSF shell, a folded cortex (GM), white matter, deep GM, two lateral ventricles
# and two hippocampi (GM) sitting in CSF pockets (temporal horns); intensities CSF < GM < WM as
# in T1, a smooth multiplicative bias field, Gaussian noise, then z-scoring over brain voxels.
# AD: hippocampal volume = sex baseline (women smaller) x age decline x (1 - diagnosis atrophy,
# CN < MCI < AD, stronger in women) x noise, left and right a little different. The image alone
# is ambiguous (a small hippocampus may be an old woman's or an AD patient's); age and sex
# disambiguate it, so conditioning helps. Ventricles and outer CSF grow with age and diagnosis.
# The table: CSF (ABETA low in AD, PTAU/TAU high) and PET (FDG low, AV45 high) depend on the
# diagnosis only, with large noise, assay censoring and ~50% missingness (more for CN); APOE4
# is more frequent in AD. So each modality holds diagnosis information the other lacks.
# Brain age: an atrophy index grows after 20 and faster after 40, faster in men, plus a
# per-subject "brain age gap" (wider in men, cf. Sec. 4.2.6); it drives ventricle size, outer CSF, cortical thinning and
# hippocampal shrinkage. Sex changes the slope, so sex-aware reading of the image helps.

AD_SYNTH = {
    "class_fraction": {"CN": 740 / 2120, "MCI": 1015 / 2120, "AD": 365 / 2120},   # Table 2
    "age_mean_sd": {"CN": (72.2, 6.8), "MCI": (72.8, 7.6), "AD": (75.1, 7.8)},   # Table 2
    "male_fraction": {"CN": 309 / 740, "MCI": 569 / 1015, "AD": 198 / 365},       # Table 2
    "hippo_female_factor": 0.88, "hippo_age_slope": 0.012,
    "hippo_atrophy": {"CN": 0.0, "MCI": 0.12, "AD": 0.25}, "hippo_atrophy_female_gain": 1.15,
    "hippo_noise_sd": 0.05,
    "apoe4_probs": {"CN": (0.72, 0.25, 0.03), "MCI": (0.5, 0.4, 0.1), "AD": (0.33, 0.47, 0.2)},
    # attribute: (mean CN, MCI, AD), (sd CN, MCI, AD), assay range or None, decimals
    "biomarkers": {"ABETA": ((1200, 950, 650), (400, 400, 260), (200, 1700), 1),
                   "PTAU": ((21, 26, 36), (8, 12, 14), (8, 120), 2),
                   "TAU": ((230, 280, 370), (80, 110, 130), (80, 1300), 1),
                   "FDG": ((6.5, 6.2, 5.4), (0.5, 0.6, 0.7), None, 3),
                   "AV45": ((1.1, 1.2, 1.4), (0.15, 0.2, 0.2), None, 3)},
    "missing_prob": {"CSF": (0.6, 0.45, 0.45), "FDG": (0.55, 0.45, 0.4), "AV45": (0.55, 0.45, 0.45)},
    "shape": (48, 60, 48), "spacing_mm": 2.67, "crop_size": (24, 36, 24),
}
BRAIN_AGE_SYNTH = {"age_range": (8, 90), "shape": (40, 48, 40), "spacing_mm": 4.0,
                   "atrophy_slope_after_40": {"M": 0.6, "F": 0.35}, "brain_age_gap_sd": {"M": 0.08, "F": 0.06}}
HIPPO_CENTRE = (0.36, -0.12, -0.32)  # normalised (|x|, y, z) of the hippocampi


def _grid(shape):
    """Normalised coordinates in [-1, 1] per axis and a fixed cortical folding pattern."""
    u, v, w = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    fold = np.sin(9 * np.arctan2(v, u)) * np.sin(7 * np.arctan2(w, np.hypot(u, v)))
    return u, v, w, fold.astype(np.float32)


def _ell(u, v, w, c, r):
    """Normalised ellipsoid distance (< 1 inside) for centre c and radii r."""
    return ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2


def _render(grid, p, rng):
    """Brain-like float32 volume from anatomy parameters p (see the model above), z-scored in the brain."""
    from scipy import ndimage
    u, v, w, fold = grid
    s = p["scale"]
    r = np.sqrt(_ell(u, v, w, (0, 0, 0), (0.82 * s, 0.88 * s, 0.78 * s)))         # 1 at the surface
    brain = r < 1
    lab = np.where(brain, 3, 0).astype(np.uint8)                                  # 0 bg 1 CSF 2 GM 3 WM 4 hippo
    lab[brain & (r > 1 - p["csf"] - p["cortex"] * (1 + 0.35 * fold))] = 2
    lab[brain & (r > 1 - p["csf"])] = 1
    au = np.abs(u)
    lab[_ell(au, v, w, (0.12 * s, -0.2 * s, -0.02), (0.09 * s, 0.12 * s, 0.1 * s)) < 1] = 2   # deep GM
    vs = p["vent"]
    lab[_ell(au, v, w, (0.12 * s, -0.03, 0.12 * s), (0.07 * s * vs, 0.3 * s * vs ** 0.5, 0.1 * s * vs)) < 1] = 1
    for side, f in ((-1, p["hippo_left"]), (1, p["hippo_right"])):
        c = (side * HIPPO_CENTRE[0] * s, HIPPO_CENTRE[1] * s, HIPPO_CENTRE[2] * s)
        lab[_ell(u, v, w, c, (0.14 * s, 0.3 * s, 0.13 * s)) < 1] = 1                # CSF pocket
        k = s * f ** (1 / 3)
        lab[_ell(u, v, w, c, (0.1 * k, 0.24 * k, 0.09 * k)) < 1] = 4                # hippocampus
    img = np.array([0.0, 0.15, 0.55, 0.9, 0.6], np.float32)[lab]
    img = ndimage.gaussian_filter(img, 0.6, truncate=2.0)                          # partial volume
    b = p["bias"]
    img *= 1 + b[0] * u + b[1] * v + b[2] * w + b[3] * u * v + b[4] * (w * w - 0.3)  # smooth bias field
    img += rng.normal(0, p["noise"], img.shape).astype(np.float32)
    img[~brain] = 0
    vals = img[brain]
    img[brain] = (vals - vals.mean()) / vals.std()                                 # Sec. 4.2.3
    return img


def _anatomy(rng, scale, hippo, vent, csf, cortex):
    return {"scale": scale, "hippo_left": hippo * math.exp(-0.02 + rng.normal(0, 0.03)),
            "hippo_right": hippo * math.exp(0.02 + rng.normal(0, 0.03)), "vent": max(vent, 0.5),
            "csf": float(np.clip(csf, 0.02, 0.2)), "cortex": float(np.clip(cortex, 0.04, 0.2)),
            "bias": rng.normal(0, 0.06, 5), "noise": 0.04}


def _ad_crops(shape, size):
    """Boxes centred on the synthetic hippocampi; the right box is the exact mirror of the left."""
    centre = [(c + 1) / 2 * (n - 1) for c, n in zip((-HIPPO_CENTRE[0],) + HIPPO_CENTRE[1:], shape)]
    left = [int(np.clip(round(c - d / 2), 0, n - d)) for c, d, n in zip(centre, size, shape)]
    right = [shape[0] - left[0] - size[0]] + left[1:]
    return HippocampusCrops(left, right, size)


@contextlib.contextmanager
def _cohort_dir(out_dir):
    """Build a cohort in a hidden sibling folder and move it onto out_dir only when complete.

    out_dir may be absent, empty, or an earlier synthetic cohort (has cohort.json; replaced);
    anything else is refused, so nothing of the user's is deleted and no half cohort is left.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (not os.listdir(out_dir)
                                        or os.path.isfile(os.path.join(out_dir, "cohort.json")))):
        raise DataError(f"{out_dir}: exists and is not an empty folder or a synthetic cohort; choose another --out")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(out_dir)}")
    os.makedirs(os.path.join(tmp, "images"))
    try:
        yield tmp
        old = None
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _class_counts(n, fractions):
    """Largest-remainder rounding of n * fractions, at least one per class."""
    f = np.array(fractions)
    c = np.floor(n * f).astype(int)
    c[np.argsort(-(n * f - c))[: n - c.sum()]] += 1
    return np.maximum(c, 1)


def _fmt_censored(v, rng_limits, decimals):
    if rng_limits is not None and v >= rng_limits[1]:
        return f">{rng_limits[1]}"
    if rng_limits is not None and v <= rng_limits[0]:
        return f"<{rng_limits[0]}"
    return f"{v:.{decimals}f}"


def make_synthetic_ad(out_dir, n=360, seed=0, verbose=False):
    """Write a synthetic AD cohort (ad.csv, images/<Subject>.nii.gz, crops.json, cohort.json) -> csv path."""
    P = AD_SYNTH
    if n < 10:
        raise DataError(f"--n must be at least 10 for an AD cohort (got {n})")
    rng = np.random.default_rng(seed)
    counts = _class_counts(n, [P["class_fraction"][c] for c in CLASS_NAMES])
    groups = rng.permutation(np.repeat(np.arange(3), counts))
    shape, crops, grid = P["shape"], _ad_crops(P["shape"], P["crop_size"]), _grid(P["shape"])
    t0 = time.time()
    with _cohort_dir(out_dir) as tmp:
        rows = []
        for i, g in enumerate(groups):
            dx = CLASS_NAMES[g]
            male = rng.random() < P["male_fraction"][dx]
            age = float(np.clip(rng.normal(*P["age_mean_sd"][dx]), 55, 92))
            atrophy = P["hippo_atrophy"][dx] * (1 if male else P["hippo_atrophy_female_gain"])
            hippo = ((1 if male else P["hippo_female_factor"]) * (1 - P["hippo_age_slope"] * (age - 73))
                     * (1 - atrophy) * math.exp(rng.normal(0, P["hippo_noise_sd"])))
            anat = _anatomy(rng, (1.0 if male else 0.96) * math.exp(rng.normal(0, 0.02)), hippo,
                            vent=1 + 0.025 * (age - 73) + (0, 0.1, 0.25)[g] + rng.normal(0, 0.08),
                            csf=0.06 + 0.002 * (age - 73) + 0.01 * g, cortex=0.12 - 0.001 * (age - 73) - 0.008 * g)
            subj = f"SYN{i + 1:05d}"
            _save_nifti(_render(grid, anat, rng), P["spacing_mm"], os.path.join(tmp, "images", f"{subj}.nii.gz"))
            row = {"Subject": subj, "Group": dx, "AGE": f"{age:.1f}", "PTGENDER": "Male" if male else "Female",
                   "PTEDUCAT": str(int(np.clip(round(rng.normal(16.2 - 0.6 * (g == 2), 2.8)), 6, 20))),
                   "APOE4": str(int(rng.choice(3, p=P["apoe4_probs"][dx])))}
            miss = {k: rng.random() < p[g] for k, p in P["missing_prob"].items()}
            for col, (mu, sd, lim, dec) in P["biomarkers"].items():
                v = rng.normal(mu[g], sd[g])
                gone = miss["CSF"] if col in ("ABETA", "PTAU", "TAU") else miss[col]
                row[col] = "" if gone else _fmt_censored(max(v, 0.01), lim, dec)
            rows.append(row)
            if verbose and (i + 1) % 100 == 0:
                print(f"synth-ad: {i + 1}/{n} subjects, {time.time() - t0:.0f} s", flush=True)
        _write_csv(rows, ["Subject", "Group"] + list(AD_ATTRIBUTES), os.path.join(tmp, "ad.csv"))
        crops.save(os.path.join(tmp, "crops.json"))
        _save_json({"task": "ad", "n": int(n), "seed": int(seed), "image_shape": list(shape),
                    "spacing_mm": P["spacing_mm"], "crops": "crops.json", "class_counts":
                    dict(zip(CLASS_NAMES, map(int, counts))), "generator": P}, os.path.join(tmp, "cohort.json"))
    return os.path.join(os.path.abspath(out_dir), "ad.csv")


def make_synthetic_brain_age(out_dir, n=400, seed=0, verbose=False):
    """Write a synthetic brain-age cohort (brain_age.csv with an `image` column, images/, cohort.json) -> csv path."""
    P = BRAIN_AGE_SYNTH
    if n < 10:
        raise DataError(f"--n must be at least 10 for a brain-age cohort (got {n})")
    rng = np.random.default_rng(seed)
    grid, t0 = _grid(P["shape"]), time.time()
    with _cohort_dir(out_dir) as tmp:
        rows = []
        for i in range(n):
            male = bool(rng.random() < 0.5)
            lo, hi = P["age_range"]  # a mix: uniform over the life span and a UK-Biobank-like bump at ~63
            age = float(rng.uniform(lo, hi) if rng.random() < 0.4 else np.clip(rng.normal(63, 8), lo, hi))
            sx = "M" if male else "F"
            a = (0.25 * max(age - 20, 0) / 50 + P["atrophy_slope_after_40"][sx] * max(age - 40, 0) ** 2 / 2500
                 + rng.normal(0, P["brain_age_gap_sd"][sx]))                      # atrophy index
            scale = (1.0 if male else 0.95) * (0.92 + 0.08 * min(age, 14) / 14) * math.exp(rng.normal(0, 0.02))
            anat = _anatomy(rng, scale, hippo=max(1 - 0.3 * a, 0.3), vent=0.8 + 1.2 * a, csf=0.04 + 0.08 * a,
                            cortex=0.15 - 0.02 * (min(age, 20) - 8) / 12 - 0.05 * a)
            subj = f"BA{i + 1:05d}"
            _save_nifti(_render(grid, anat, rng), P["spacing_mm"], os.path.join(tmp, "images", f"{subj}.nii.gz"))
            rows.append({"Subject": subj, "Age": f"{age:.1f}", "Sex": "M" if male else "F",
                         "image": f"images/{subj}.nii.gz"})
            if verbose and (i + 1) % 100 == 0:
                print(f"synth-brain-age: {i + 1}/{n} subjects, {time.time() - t0:.0f} s", flush=True)
        _write_csv(rows, ["Subject", "Age", "Sex", "image"], os.path.join(tmp, "brain_age.csv"))
        _save_json({"task": "brain_age", "n": int(n), "seed": int(seed), "image_shape": list(P["shape"]),
                    "spacing_mm": P["spacing_mm"], "generator": P}, os.path.join(tmp, "cohort.json"))
    return os.path.join(os.path.abspath(out_dir), "brain_age.csv")


def _write_csv(rows, columns, path):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, columns)
        wr.writeheader()
        wr.writerows(rows)

# -----------------------------------------------------------------------------
# command line


def _check_images(paths, subjects):
    """Decode and validate every image; all must share one shape. -> that shape."""
    shape, t0 = None, time.time()
    for k, (p, s) in enumerate(zip(paths, subjects)):
        sh = load_volume(p, s, expected_shape=shape).shape
        shape = shape or sh
        if len(paths) >= 200 and (k + 1) % 200 == 0:
            print(f"checked {k + 1}/{len(paths)} images, {time.time() - t0:.0f} s", flush=True)
    return shape


def _missing_summary(raw):
    _, X = TabularPreprocessor.parse(raw)
    frac = np.isnan(X).mean(0)
    return ", ".join(f"{c} {f:.0%}" for c, f in zip(AD_CONTINUOUS, frac) if f > 0) or "none"


def main(argv=None):
    ap = argparse.ArgumentParser(description="HyperFusion data: synthetic cohorts and table/image checks.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, n in (("synth-ad", 360), ("synth-brain-age", 400)):
        sp = sub.add_parser(name, help=f"write a synthetic cohort (default n={n})")
        sp.add_argument("--out", required=True, help="output folder (absent, empty, or an earlier cohort)")
        sp.add_argument("--n", type=int, default=n)
        sp.add_argument("--seed", type=int, default=0)
    for name in ("check-ad", "check-brain-age"):
        sp = sub.add_parser(name, help="validate a table and all its images, print a one-line summary")
        sp.add_argument("csv")
        sp.add_argument("--image-dir", default=None, help="default: <csv folder>/images")
        sp.add_argument("--no-images", action="store_true", help="check the table only")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.cmd == "synth-ad":
        path = make_synthetic_ad(a.out, a.n, a.seed, verbose=True)
        print(f"wrote {a.n} subjects to {path}, images {AD_SYNTH['shape']} at {AD_SYNTH['spacing_mm']} mm, "
              f"crops {AD_SYNTH['crop_size']}, {time.time() - t0:.1f} s")
    elif a.cmd == "synth-brain-age":
        path = make_synthetic_brain_age(a.out, a.n, a.seed, verbose=True)
        print(f"wrote {a.n} subjects to {path}, images {BRAIN_AGE_SYNTH['shape']} at "
              f"{BRAIN_AGE_SYNTH['spacing_mm']} mm, {time.time() - t0:.1f} s")
    elif a.cmd == "check-ad":
        t = read_ad_table(a.csv, a.image_dir, need_images=not a.no_images)
        shape = _check_images(t.image_paths, t.subjects) if t.image_paths else None
        crops_path = os.path.join(os.path.dirname(os.path.abspath(a.csv)), "crops.json")
        if shape and os.path.isfile(crops_path):
            HippocampusCrops.load(crops_path).check(shape, crops_path)
        counts = ", ".join(f"{c} {int((t.labels == k).sum())}" for k, c in enumerate(CLASS_NAMES))
        print(f"ok: {a.csv}: {len(t.subjects)} subjects ({counts}), {int((t.sex == 0).sum())} male, age "
              f"{t.age.mean():.1f} +- {t.age.std():.1f}, missing: {_missing_summary(t.raw)}"
              + (f", images {shape}" if shape else ""))
    else:
        t = read_brain_age_table(a.csv, a.image_dir, need_images=not a.no_images)
        shape = _check_images(t.image_paths, t.subjects) if t.image_paths else None
        print(f"ok: {a.csv}: {len(t.subjects)} subjects, {int((t.sex == 0).sum())} male, age "
              f"{t.age.mean():.1f} +- {t.age.std():.1f} ({t.age.min():.0f}-{t.age.max():.0f})"
              + (f", images {shape}" if shape else ""))


if __name__ == "__main__":
    run_cli(main)
