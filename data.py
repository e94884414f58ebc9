"""Real data in: tables and NIfTI images read and validated, splits, hippocampus crops, the image cache, Datasets.

On-disk format (the synthetic cohorts of synthetic.py use it too, so the demos exercise the real path):
    AD:        a CSV with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4, ABETA, PTAU, TAU, FDG, AV45
               (ADNIMERGE names) and optionally `image` (path relative to the CSV), else
               <image dir>/<Subject>.nii.gz; crops.json with the hippocampus boxes.
    brain age: a CSV with Subject, Age, Sex (M/F) [, image]; images as above.
Every error is a UserError naming the file, subject, line or column.

Command line (bad input -> one line `error: ...` on stderr, exit status 2):
    python data.py check-ad CSV [--image-dir DIR] [--no-images]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
"""
import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import math
import multiprocessing
import os
import time
import zlib

try:
    import fcntl
except ImportError:  # not on Windows: prepare() then takes no lock
    fcntl = None
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from safeio import UserError, atomic_path, run_cli, write_json
from tabular import AD_ATTRIBUTES, AD_CONTINUOUS, SEX_CODES, TabularPreprocessor, parse_value

CLASS_NAMES = ("CN", "MCI", "AD")
GROUP_ALIASES = {"CN": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI", "AD": "AD", "DEMENTIA": "AD"}


# ----------------------------------------------------------------------------------------------
# NIfTI volumes, read with validation

def _where(path, subject=None):
    return f"{path} (subject {subject})" if subject is not None else f"{path}"


def load_nifti(path, subject=None, canonical=True):
    """Load and validate one NIfTI -> nibabel image holding float32 3D data (RAS if canonical).

    Errors (UserError naming the file and subject): missing, unreadable, truncated or corrupt
    gzip, not 3D (trailing singleton dimensions are squeezed; the shape is checked from the
    header, before decoding), NaN or inf voxels.
    """
    where = _where(path, subject)
    if not os.path.isfile(path):
        raise UserError(f"{where}: image file not found")
    try:
        img = nib.load(path)
    except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise UserError(f"{where}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise UserError(f"{where}: expected a 3D image, got shape {tuple(img.shape)}")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # short gzip stream, bad CRC, short file
        raise UserError(f"{where}: truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise UserError(f"{where}: {bad} NaN/inf voxels")
    out = nib.Nifti1Image(data, img.affine)
    return nib.as_closest_canonical(out) if canonical else out


def load_volume(path, subject=None, expected_shape=None):
    """Validated float32 (X, Y, Z) array in RAS orientation (see load_nifti)."""
    data = np.asarray(load_nifti(path, subject).dataobj, dtype=np.float32)
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        raise UserError(f"{_where(path, subject)}: image shape {tuple(data.shape)}, expected {tuple(expected_shape)}")
    return data


def save_nifti(volume, spacing, path):
    """Write a float32 volume with a RAS affine of isotropic `spacing` mm, centred on the origin."""
    shape = np.array(volume.shape[:3])
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (shape - 1) / 2  # world (0,0,0) at the volume centre
    img = nib.Nifti1Image(volume.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


# ----------------------------------------------------------------------------------------------
# Tables

def read_csv_rows(csv_path, required):
    """-> (list of (line number, row dict), fieldnames). Checks columns, field counts and encoding."""
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: table not found")
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = fields
            missing = [c for c in required if c not in fields]
            if missing:
                raise UserError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            for row in reader:
                if None in row:
                    raise UserError(f"{csv_path} line {reader.line_num}: {len(fields) + len(row[None])} fields, "
                                    f"the header has {len(fields)}")
                row = {k: (v or "").strip() for k, v in row.items()}  # short rows: absent cells are empty
                if any(row.values()):                                  # skip blank lines
                    rows.append((reader.line_num, row))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable UTF-8 CSV table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise UserError(f"{csv_path}: no data rows")
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
            raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: {p}")
        paths.append(p)
    return paths


def check_subjects(csv_path, rows):
    subjects, seen = [], {}
    for line, row in rows:
        s = row.get("Subject", "")
        if not s:
            raise UserError(f"{csv_path} line {line}: empty Subject")
        if s in seen:
            raise UserError(f"{csv_path} line {line}: subject {s} repeats line {seen[s]}")
        seen[s] = line
        subjects.append(s)
    return subjects


def _number(csv_path, line, row, col, required):
    try:
        v = parse_value(row.get(col, ""))
    except ValueError:
        raise UserError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}: "
                        f"not a number: {row.get(col)!r}") from None
    if required and math.isnan(v):
        raise UserError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col} is empty")
    if col in ("AGE", "Age") and not 0 <= v <= 120:
        raise UserError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}: "
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
        raise UserError(f"classes must be 2 (CN vs AD) or 3, got {classes}")
    rows, fields = read_csv_rows(csv_path, ("Subject", "Group") + AD_ATTRIBUTES)
    keep, labels, sexes, ages = [], [], [], []
    for line, row in rows:
        g = GROUP_ALIASES.get(row["Group"].upper())
        if g is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column Group: unknown diagnosis "
                            f"{row['Group']!r} (expected CN, MCI, EMCI, LMCI, AD or Dementia)")
        sx = SEX_CODES.get(row["PTGENDER"].lower())
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column PTGENDER: "
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
        raise UserError(f"{csv_path}: no CN or AD subjects")
    subjects = check_subjects(csv_path, keep)
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
    rows, fields = read_csv_rows(csv_path, ("Subject", "Age", "Sex"))
    ages, sexes = [], []
    for line, row in rows:
        ages.append(_number(csv_path, line, row, "Age", required=True))
        sx = SEX_CODES.get(row["Sex"].lower())
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column Sex: "
                            f"expected M or F, got {row['Sex']!r}")
        sexes.append(sx)
    subjects = check_subjects(csv_path, rows)
    paths = _image_paths(csv_path, rows, fields, subjects, image_dir, need_images)
    return BrainAgeTable(subjects, np.array(ages, np.float32), np.array(sexes, np.int64), paths, os.fspath(csv_path))


def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    sex = np.asarray(sex, np.int64)
    return np.eye(2, dtype=np.float32)[sex]


# ----------------------------------------------------------------------------------------------
# Splits (Sec. 4.3.4, App. C.1; Sec. 4.2.3)

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
        raise UserError(f"{n} subjects cannot be split into {n_subsets} subsets")
    order = _stratified_order([sex, labels, _bins(age, n_age_bins)], seed)
    subsets = np.empty(n, np.int64)
    subsets[order] = np.arange(n) % n_subsets
    return subsets


def ad_fold(subsets, fold, test_subset=4):
    """-> (train_idx, val_idx, test_idx): test = subset 4, validation = subset `fold` (0..3), train = rest."""
    subsets = np.asarray(subsets)
    n_sub = int(subsets.max()) + 1
    if not (0 <= fold < n_sub) or fold == test_subset:
        raise UserError(f"fold must be in 0..{n_sub - 2} (subset {test_subset} is the test set), got {fold}")
    idx = np.arange(len(subsets))
    return (idx[(subsets != fold) & (subsets != test_subset)], idx[subsets == fold], idx[subsets == test_subset])


def brain_age_split(age, sex, seed, fractions=(0.8, 0.1, 0.1), n_age_bins=20):
    """-> (train_idx, val_idx, test_idx), 80/10/10 stratified by sex and age bins (Sec. 4.2.3).

    Same dealing as ad_split, but by quotas: the next subject goes to the part furthest below
    its share so far, so every (sex, age bin) group is cut in the given fractions.
    """
    fr = np.asarray(fractions, np.float64)
    if len(age) < len(fr) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise UserError(f"cannot split {len(age)} subjects into fractions {tuple(fractions)}")
    order = _stratified_order([sex, _bins(age, n_age_bins)], seed)
    counts = np.zeros(len(fr))
    part = np.empty(len(order), np.int64)
    for k, i in enumerate(order):
        j = int(np.argmax(fr * (k + 1) - counts))
        part[i] = j
        counts[j] += 1
    return tuple(np.flatnonzero(part == j) for j in range(len(fr)))


# ----------------------------------------------------------------------------------------------
# Hippocampus crops (Sec. 3.5.2)

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
                raise UserError(f"{where}: {name} hippocampus box start {st} size {self.size} "
                                f"does not fit in image shape {tuple(shape)}")

    def __call__(self, volume):
        self.check(volume.shape)
        l, r, s = self.left_start, self.right_start, self.size
        left = volume[l[0]:l[0] + s[0], l[1]:l[1] + s[1], l[2]:l[2] + s[2]]
        right = volume[r[0]:r[0] + s[0], r[1]:r[1] + s[1], r[2]:r[2] + s[2]][::-1]
        return np.stack([left, right])                                             # (2, D, H, W)

    def cache_key(self):
        return f"crops{self.left_start}{self.right_start}{self.size}"

    def as_dict(self):
        """The three boxes' numbers as crops.json holds them (and checkpoints, so a run replays its crops)."""
        return {"left_start": list(self.left_start), "right_start": list(self.right_start), "size": list(self.size)}

    def save(self, path):
        write_json(self.as_dict(), path)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
            return cls(d["left_start"], d["right_start"], d["size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a crops file ({type(exc).__name__}: {exc})") from None


def load_crops(crops_json, data_csv):
    """The two hippocampus boxes of a table: --crops, else crops.json next to the CSV, else the MNI152 default."""
    path = crops_json or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "crops.json")
    return HippocampusCrops.load(path) if (crops_json or os.path.isfile(path)) else HippocampusCrops.mni152_1mm()


# ----------------------------------------------------------------------------------------------
# Decode-once image cache

def default_cache_dir(data_csv):
    """Where decoded images are cached unless --cache-dir says otherwise: <csv folder>/cache."""
    return os.path.join(os.path.dirname(os.path.abspath(data_csv)), "cache")


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
            raise UserError(f"cache dtype must be float16 or float32, got {dtype!r}")
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
            raise UserError(f"{self.paths[i]} (subject {self.names[i]}): values overflow {self.dtype}; use float32")
        prefix = os.path.basename(out)[:-len("0123456789.npy")]   # same subject and config, older source
        for old in os.listdir(self.cache_dir):   # (never `out` itself, which another process may be reading)
            if old.startswith(prefix) and old.endswith(".npy") and len(old) == len(prefix) + 14 \
                    and old != os.path.basename(out):
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

    def prepare(self, progress=True, workers=1):
        """Decode every missing entry now, printing progress (count, time left) when there are many.

        workers > 1 and at least PARALLEL_FROM entries to decode: that many processes decode them
        (spawned, so nothing of the parent's threads is inherited); each entry is the same file, byte
        for byte, as a serial decode writes (the same decode, np.save and atomic rename).
        Processes that share the cache (run-protocol --jobs) take turns: the first decodes, the others
        then find its entries (`lock`)."""
        with self.lock():
            todo = [i for i in range(len(self)) if not os.path.exists(self.entry(i))]
            t0, last = time.time(), 0.0
            pool = None
            if workers > 1 and len(todo) >= self.PARALLEL_FROM:
                pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                              initializer=_hold_cache, initargs=(self,))
                done = pool.map(_decode_held, todo, chunksize=max(1, min(16, len(todo) // (4 * workers))))
            else:
                done = (self._decode(i, self.entry(i)) for i in todo)
            try:
                for k, _ in enumerate(done):
                    now = time.time()
                    if pool is not None and k == 0:
                        t0 = now                  # time left from the pace once the processes have started
                    elif progress and len(todo) >= 50 and (now - last > 5 or k + 1 == len(todo)):
                        left = (now - t0) / (k + (pool is None)) * (len(todo) - k - 1)
                        print(f"cache {self.cache_dir}: {k + 1}/{len(todo)} decoded"
                              f"{f' by {workers} processes' if pool else ''}, {left:.0f} s left", flush=True)
                        last = now
                self.n_decoded += len(todo) if pool is not None else 0
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        return self

    @contextlib.contextmanager
    def lock(self):
        """No other process is inside `lock` of this cache folder meanwhile (fcntl.flock on the folder).
        Where that is not to be had (no fcntl, a file system without flock) it locks nothing: the
        entries stay right (atomic writes), only decoded more than once."""
        fd = os.open(self.cache_dir, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError, AttributeError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                   # releases the lock

    PARALLEL_FROM = 200  # below this many entries, starting the processes costs more than it saves


_held = {}  # the ImageCache a decoding process works for (set once per process by _hold_cache)


def _hold_cache(cache):
    _held["cache"] = cache


def _decode_held(i):
    cache = _held["cache"]
    cache._decode(i, cache.entry(i))


# ----------------------------------------------------------------------------------------------
# Datasets

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
            raise UserError(f"item {i}: a whole volume {tuple(vol.shape)} needs `crops` "
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


# ----------------------------------------------------------------------------------------------
# Command line

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
    ap = argparse.ArgumentParser(description="Validate a table and every image it names, before a long run.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check-ad", "check-brain-age"):
        sp = sub.add_parser(name, help="validate a table and all its images, print a one-line summary")
        sp.add_argument("csv")
        sp.add_argument("--image-dir", default=None, help="default: <csv folder>/images")
        sp.add_argument("--no-images", action="store_true", help="check the table only")
    a = ap.parse_args(argv)
    if a.cmd == "check-ad":
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
