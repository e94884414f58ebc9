"""Real data in: NIfTI images read and validated, the tables (tables.py), hippocampus crops, the image cache, Datasets.

On-disk format (the synthetic cohorts of synthetic.py use it too, so the demos exercise the real path):
    AD:        a CSV with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4, ABETA, PTAU, TAU, FDG, AV45
               (ADNIMERGE names) and optionally `image` (path relative to the CSV), else
               <image dir>/<Subject>.nii.gz; crops.json with the hippocampus boxes.
    brain age: a CSV with Subject, Age, Sex (M/F) [, image]; images as above.
Every error is a UserError naming the file, subject, line or column. The tables are read by tables.py;
its readers are re-exported here, so `data` stays the one door for data coming in.

Command line (bad input -> one line `error: ...` on stderr, exit status 2):
    python data.py check-ad CSV [--image-dir DIR] [--no-images] [--group-map SMC=CN] [--preview DIR]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
    python data.py from-adnimerge ADNIMERGE.csv --out table.csv [--visit bl] [--group-map SMC=CN]
--preview writes DIR/<name>_boxes.png and _crops.png, <name> the Subject, or for one that is not a plain
file name (`../../x`, from an `image` column) a safe name inside DIR (tables.output_names), printed.
from-adnimerge's table is written verbatim (the code reads it back), not escaped for spreadsheets.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import struct
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

from safeio import (ArgumentParser, UserError, atomic_path, check_number, check_output, run_cli, warn, write_csv,
                    write_json)
from tables import (CLASS_NAMES, GROUP_ALIASES, ADTable, BrainAgeTable, check_subjects, diagnosis,  # noqa: F401
                    find_image, number_cell, output_names, parse_group_map, read_ad_table, read_brain_age_table,
                    read_csv_rows, skipped_summary, table_sha256)
from tabular import AD_ATTRIBUTES, is_missing_code


# ----------------------------------------------------------------------------------------------
# NIfTI volumes, read with validation

def _where(path, subject=None):
    return f"{path} (subject {subject})" if subject is not None else f"{path}"


def _open_nifti(path, where):
    """One NIfTI's header, nothing decoded -> (nibabel image, its 3D shape with trailing 1s squeezed)."""
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
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise UserError(f"{where}: the header's voxel-to-world affine is degenerate (a zero voxel size?): "
                        f"{img.affine[:3, :3].round(4).tolist()}")
    return img, shape


def load_nifti(path, subject=None, canonical=True):
    """Load and validate one NIfTI -> nibabel image holding float32 3D data (RAS if canonical).

    Errors (UserError naming the file and subject): missing, unreadable, truncated or corrupt
    gzip, not 3D (trailing singleton dimensions are squeezed; the shape is checked from the
    header, before decoding), NaN or inf voxels.
    """
    where = _where(path, subject)
    img, shape = _open_nifti(path, where)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # short gzip stream, bad CRC, short file
        raise UserError(f"{where}: truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise UserError(f"{where}: {bad} NaN/inf voxels")
    out = nib.Nifti1Image(data, img.affine)
    return nib.as_closest_canonical(out) if canonical else out


def image_geometry(path, subject=None):
    """-> (shape, voxel size in mm) of one image as load_volume will return it (RAS), from its header alone."""
    img, shape = _open_nifti(path, _where(path, subject))
    zooms = nib.affines.voxel_sizes(img.affine)[:3]
    ornt = nib.orientations.io_orientation(img.affine)
    axes = ornt[:, 0].astype(int) if np.isfinite(ornt).all() else np.arange(3)  # input axis i -> RAS axis axes[i]
    ras_shape, ras_zooms = [0] * 3, [0.0] * 3
    for i, j in enumerate(axes):
        ras_shape[j], ras_zooms[j] = int(shape[i]), round(float(zooms[i]), 4)
    return tuple(ras_shape), tuple(ras_zooms)


def check_image_geometry(paths, subjects):
    """Every image of a cohort has one shape and one voxel size, read from the headers (nothing decoded,
    so a cohort is checked in seconds, before the cache decodes it). -> (shape, voxel size in mm).

    The first image that differs is refused naming it, the first image and both shapes (or voxel sizes):
    a network sees a fixed grid, and mixed voxel sizes mean the same voxel is not the same anatomy."""
    first = None
    for p, s in zip(paths, subjects):
        shape, zooms = image_geometry(p, s)
        if first is None:
            first = (shape, zooms, _where(p, s))
        elif shape != first[0]:
            raise UserError(f"{_where(p, s)}: image shape {shape} differs from {first[0]} of {first[2]}; every "
                            f"image of a cohort must have one shape (resample them, e.g. with preprocess.py)")
        elif not np.allclose(zooms, first[1], rtol=1e-3, atol=1e-4):
            raise UserError(f"{_where(p, s)}: voxel size {zooms} mm differs from {first[1]} mm of {first[2]}; every "
                            f"image of a cohort must have one voxel size (resample them, e.g. with preprocess.py)")
    return (first[0], first[1]) if first else (None, None)


def image_fingerprint(paths):
    """The images' part of a run's identity: sha256 of every image's file name and size, in table order.

    Cheap (no image is read) and stable when the folder is moved or copied; re-exported, re-preprocessed
    or re-ordered images change it."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.basename(p)}\t{os.path.getsize(p)}\n".encode())
    return h.hexdigest()


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


def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    sex = np.asarray(sex, np.int64)
    return np.eye(2, dtype=np.float32)[sex]


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
        """crops.json -> HippocampusCrops; each box must be three whole numbers, starts >= 0, sizes >= 1."""
        try:
            with open(path) as f:
                d = json.load(f)
            boxes = {k: d[k] for k in ("left_start", "right_start", "size")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a crops file ({type(exc).__name__}: {exc})") from None
        for k, v in boxes.items():
            whole = isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x == int(x) for x in v)
            if not whole:
                raise UserError(f"{path}: {k} must be three whole numbers (x, y, z voxels), got {v!r}")
            if min(v) < (1 if k == "size" else 0):
                raise UserError(f"{path}: {k} {v}: " + ("every size must be at least 1 voxel" if k == "size"
                                                        else "a box cannot start before voxel 0"))
        return cls(**boxes)


def crops_path(crops_json, data_csv):
    """Where a table's hippocampus boxes come from: --crops, else crops.json next to the CSV; None: the default."""
    path = crops_json or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "crops.json")
    return path if (crops_json or os.path.isfile(path)) else None


def load_crops(crops_json, data_csv):
    """The two hippocampus boxes of a table: --crops, else crops.json next to the CSV, else the MNI152 default."""
    path = crops_path(crops_json, data_csv)
    return HippocampusCrops.load(path) if path else HippocampusCrops.mni152_1mm()


# ----------------------------------------------------------------------------------------------
# Decode-once image cache

def cache_folder(cache_dir, data_csv):
    """Where decoded images are cached: --cache-dir, else <csv folder>/cache."""
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "cache")


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
# ADNIMERGE as downloaded: one row per visit -> one row per subject

def from_adnimerge(path, out, visit="bl", dx_column=None, group_map=None):
    """Keep one row per subject of an ADNIMERGE export (PTID, VISCODE, DX_bl / DX, ...): the `visit`
    row, its diagnosis mapped to CN / MCI / AD (aliases and --group-map; other values and empty cells
    dropped with a count), the columns named as this project reads them; AGE is the age at that visit
    (AGE + Years_bl). Writes `out` atomically. -> a report of what was kept and dropped."""
    dx_column = dx_column or ("DX_bl" if visit == "bl" else "DX")
    rows, fields = read_csv_rows(path, ("PTID", "VISCODE", dx_column) + AD_ATTRIBUTES)
    kept, seen, dropped = [], set(), {}
    subjects = {r["PTID"] for _, r in rows if r["PTID"]}
    for line, r in rows:
        if r["VISCODE"].strip().lower() != visit.lower() or not r["PTID"] or r["PTID"] in seen:
            continue
        seen.add(r["PTID"])
        g = diagnosis(r[dx_column], group_map)
        if g is None:
            dropped[r[dx_column]] = dropped.get(r[dx_column], 0) + 1
            continue
        row = {"Subject": r["PTID"], "Group": g, **{a: r[a] for a in AD_ATTRIBUTES}}
        years = number_cell(path, line, r, "Years_bl", required=False) if "Years_bl" in fields else math.nan
        age = number_cell(path, line, r, "AGE", required=False)
        if math.isfinite(years) and math.isfinite(age):
            row["AGE"] = f"{age + years:.1f}"
        kept.append(row)
    if not kept:
        raise UserError(f"{path}: no subject has a {visit!r} visit with a CN, MCI or AD diagnosis in {dx_column}")
    write_csv(kept, ["Subject", "Group"] + list(AD_ATTRIBUTES), out)
    counts = ", ".join(f"{c} {sum(r['Group'] == c for r in kept)}" for c in CLASS_NAMES)
    return (f"kept {len(kept)} subjects ({counts}) from {len(rows)} rows -> {out}; dropped: "
            f"{len(subjects) - len(seen)} subjects without a {visit!r} visit"
            + "".join(f", {dx_column} {k or '(empty)'} {v}" for k, v in sorted(dropped.items())))


# ----------------------------------------------------------------------------------------------
# Previews: see the hippocampus boxes before training for days

def write_png(rgb, path):
    """(H, W, 3) uint8 -> an RGB PNG file, with the standard library's zlib (no imaging dependency)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))                 # filter 0 on every row
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(png)


def _gray(plane):
    """A 2D slice -> (H, W, 3) uint8, 1st-99th percentile window, anterior / superior at the top."""
    lo, hi = np.percentile(plane, [1, 99])
    g = (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).T[::-1]
    return np.repeat(g[:, :, None], 3, 2).copy()


def preview_crops(volume, crops, path_boxes, path_crops):
    """Two PNGs: the axial and coronal mid-slices through the boxes with the left (red) and right (green)
    boxes drawn; and the two crops' axial and coronal mid-slices (the right one mirrored)."""
    crops.check(volume.shape)
    panels = []
    for axis in (2, 1):                                                            # axial (z), coronal (y)
        k = crops.left_start[axis] + crops.size[axis] // 2
        img = _gray(np.take(volume, k, axis))
        a, b = [d for d in range(3) if d != axis]                                  # (x, y) or (x, z)
        for start, colour in ((crops.left_start, (255, 0, 0)), (crops.right_start, (0, 255, 0))):
            x0, x1 = start[a], start[a] + crops.size[a] - 1
            r0, r1 = img.shape[0] - 1 - (start[b] + crops.size[b] - 1), img.shape[0] - 1 - start[b]
            img[[r0, r1], x0:x1 + 1], img[r0:r1 + 1, [x0, x1]] = colour, colour
        panels.append(img)
    height = max(p.shape[0] for p in panels)
    pad = lambda p: np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0)))
    write_png(np.concatenate([pad(p) for p in panels], 1), path_boxes)
    pair = crops(volume)                                                           # (2, D, H, W)
    tiles = [_gray(np.take(side, side.shape[axis] // 2, axis)) for side in pair for axis in (2, 1)]
    height = max(t.shape[0] for t in tiles)
    write_png(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 2), (0, 0))) for t in tiles], 1), path_crops)


# ----------------------------------------------------------------------------------------------
# Command line

def _check_images(paths, subjects):
    """Every image's header (one shape, one voxel size), then every image decoded and validated. -> the shape."""
    shape, t0 = None, time.time()
    check_image_geometry(paths, subjects)
    for k, (p, s) in enumerate(zip(paths, subjects)):
        sh = load_volume(p, s, expected_shape=shape).shape
        shape = shape or sh
        if len(paths) >= 200 and (k + 1) % 200 == 0:
            print(f"checked {k + 1}/{len(paths)} images, {time.time() - t0:.0f} s", flush=True)
    return shape


def _empty_cells(raw):
    """How many cells of each attribute column are missing (empty, or ADNI's -4 / -1), with the fraction."""
    n = len(raw)
    counts = {a: sum(1 for r in raw if not r[a].strip() or is_missing_code(r[a])) for a in AD_ATTRIBUTES}
    return ", ".join(f"{a} {c}" + (f" ({c / n:.0%})" if c else "") for a, c in counts.items())


def main(argv=None):
    ap = ArgumentParser(description="Validate a table and every image it names, before a long run.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check-ad", "check-brain-age"):
        sp = sub.add_parser(name, help="validate a table and all its images, print a one-line summary")
        sp.add_argument("csv")
        sp.add_argument("--image-dir", default=None, help="default: <csv folder>/images")
        sp.add_argument("--no-images", action="store_true", help="check the table only")
        if name == "check-ad":
            sp.add_argument("--group-map", nargs="+", metavar="VALUE=DX", help="as in train_ad.py, e.g. SMC=CN")
            sp.add_argument("--crops", help="crops.json (default: next to the CSV, else the MNI152 boxes)")
            sp.add_argument("--preview", metavar="DIR", help="write PNGs of the boxes and crops of a few subjects")
            sp.add_argument("--preview-n", type=int, default=3, help="subjects to preview (default 3)")
    sp = sub.add_parser("from-adnimerge", help="one row per subject from ADNIMERGE.csv (one row per visit)")
    sp.add_argument("csv")
    sp.add_argument("--out", required=True, help="the table to write, as train_ad.py reads it")
    sp.add_argument("--visit", default="bl", help="VISCODE to keep (default bl, the baseline)")
    sp.add_argument("--dx-column", help="diagnosis column (default DX_bl at baseline, else DX)")
    sp.add_argument("--group-map", nargs="+", metavar="VALUE=DX", help="e.g. SMC=CN (default: such rows dropped)")
    a = ap.parse_args(argv)
    if a.cmd == "from-adnimerge":
        check_output("--out", a.out, [a.csv])
        print(from_adnimerge(a.csv, a.out, a.visit, a.dx_column, parse_group_map(a.group_map)))
        return
    if a.cmd == "check-ad":
        check_number("--preview-n", a.preview_n, least=1)
        if a.preview and a.no_images:
            raise UserError(f"--preview {a.preview}: previews need the images; drop --no-images")
        t = read_ad_table(a.csv, a.image_dir, need_images=not a.no_images, group_map=parse_group_map(a.group_map))
        if t.skipped:
            print(skipped_summary(t))
        shape = _check_images(t.image_paths, t.subjects) if t.image_paths else None
        crops = load_crops(a.crops, a.csv)
        own = crops_path(a.crops, a.csv)
        if shape and own:
            crops.check(shape, own)
        elif shape and any(s + d > n for st in (crops.left_start, crops.right_start)
                           for s, d, n in zip(st, crops.size, shape)):
            warn(f"no crops.json: the default MNI152 1 mm boxes do not fit images {shape}; image models "
                 f"need --crops FILE")
        if a.preview and t.image_paths:
            os.makedirs(a.preview, exist_ok=True)
            shown = t.subjects[:a.preview_n]
            names = output_names(shown)   # inside --preview whatever the Subject (`../../x` from an image column)
            for i, name in enumerate(names):
                base = os.path.join(a.preview, name)
                preview_crops(load_volume(t.image_paths[i], t.subjects[i]), crops, base + "_boxes.png",
                              base + "_crops.png")
            renamed = [f"{s!r} as {n}" for s, n in zip(shown, names) if s != n]
            print(f"wrote {2 * len(names)} PNGs to {a.preview}: <Subject>_boxes.png (axial and "
                  f"coronal mid-slices, left box red, right box green) and <Subject>_crops.png (both crops)"
                  + (f"; written under a safe file name: {', '.join(renamed)}" if renamed else ""))
        counts = ", ".join(f"{c} {int((t.labels == k).sum())}" for k, c in enumerate(CLASS_NAMES))
        absent = [c for k, c in enumerate(CLASS_NAMES) if not (t.labels == k).any()]
        if absent:
            warn(f"{a.csv}: no {' or '.join(absent)} subjects: train_ad.py needs every class in every subset "
                 f"(--classes 2 for CN vs AD)")
        print(f"ok: {a.csv}: {len(t.subjects)} subjects ({counts}), {int((t.sex == 0).sum())} male, age "
              f"{np.nanmean(t.age):.1f} +- {np.nanstd(t.age):.1f}, empty cells: {_empty_cells(t.raw)}"
              + (f", images {shape}" if shape else ""))
    else:
        t = read_brain_age_table(a.csv, a.image_dir, need_images=not a.no_images)
        shape = _check_images(t.image_paths, t.subjects) if t.image_paths else None
        print(f"ok: {a.csv}: {len(t.subjects)} subjects, {int((t.sex == 0).sum())} male, age "
              f"{t.age.mean():.1f} +- {t.age.std():.1f} ({t.age.min():.0f}-{t.age.max():.0f})"
              + (f", images {shape}" if shape else ""))


if __name__ == "__main__":
    run_cli(main)
