"""Images in: NIfTI volumes read and validated, their content hashes, the hippocampus crops.

    load_nifti / load_volume   a NIfTI read with validation (missing, truncated, not 3D, a degenerate affine,
                               NaN / inf, values beyond float16's range, no signal), RAS float32
    image_geometry, check_image_geometry   shape and voxel size from the headers alone, one per cohort
    source_hashes, image_fingerprint       sha256 of the images' bytes, remembered in <cache>/sources.json
    HippocampusCrops           the two boxes around the hippocampi (Sec. 3.5.2), crops.json
Every error is a UserError naming the file and subject. The decode-once cache of these images is
imagecache.py. data.py re-exports both (the one door for data coming in); nothing here imports torch, so the
decoding processes start in a second.
"""
import contextlib
import hashlib
import json
import math
import os
import zlib

try:
    import fcntl
except ImportError:  # not on Windows: cache_lock then locks nothing
    fcntl = None
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from safeio import Progress, UserError, atomic_path, file_sha256, warn, write_json

PROGRESS_EVERY = 5.0  # seconds at least between two progress lines (hashing, checking, decoding)

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


# ----------------------------------------------------------------------------------------------
# The cache folder: decoded images (imagecache.py) and the images' content hashes are remembered there

def cache_folder(cache_dir, data_csv):
    """Where decoded images are cached: --cache-dir, else <csv folder>/cache."""
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "cache")


CACHE_WAY_OUT = "--cache-dir names a cache folder you can write to"


def make_cache_folder(folder):
    """os.makedirs of a cache folder; one that cannot be made (a cohort on read-only storage, a folder of
    another user) is one error naming it, the reason and the way out, --cache-dir."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot make the decoded-image cache there ({exc.strerror or exc}); "
                        f"{CACHE_WAY_OUT}") from None


@contextlib.contextmanager
def cache_lock(folder):
    """No other process is inside cache_lock of this folder meanwhile (fcntl.flock on the folder).
    Where that is not to be had (no fcntl, a file system without flock) it locks nothing: the
    entries stay right (atomic writes), only decoded (or hashed) more than once."""
    make_cache_folder(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError, AttributeError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                   # releases the lock


SOURCES_INDEX = "sources.json"   # in a cache folder: the images' content hashes, by path and file identity


def file_key(st):
    """What identifies one version of a file without reading it: size, mtime, ctime and inode. ctime cannot be set
    back (os.utime sets only atime and mtime), so a file replaced by one of the same size whose old mtime was kept
    (a copy that preserves times) still has another key."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def read_sources(folder):
    """{absolute path: [size, mtime_ns, ctime_ns, inode, sha256]} of <folder>/sources.json; {} if absent or damaged
    (it is only remembered hashes: anything unreadable is hashed again)."""
    try:
        with open(os.path.join(folder, SOURCES_INDEX)) as f:
            held = json.load(f)["files"]
        return {k: v for k, v in held.items() if isinstance(v, list) and len(v) == 5}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def source_hashes(paths, folder=None, subjects=None, progress=False, known=None, every=PROGRESS_EVERY):
    """sha256 of every file's bytes -> [(file key, sha256)] in order (a missing file: (None, None)).

    Remembered in <folder>/sources.json by absolute path and file key (file_key), so a second call reads no
    image; `known` (such a dict, updated in place) saves reading the index again. Without a folder nothing
    is remembered. Progress lines every `every` seconds at least."""
    known = read_sources(folder) if known is None and folder else ({} if known is None else known)
    out, new = [], 0
    shown = Progress("hashing the images", len(paths), "images", quiet=not progress, every=every)
    for k, p in enumerate(paths):
        ap = os.path.abspath(p)
        try:
            key = file_key(os.stat(ap))
        except OSError:
            out.append((None, None))
            continue
        held = known.get(ap)
        if held is None or held[:4] != key:
            try:
                known[ap] = key + [file_sha256(ap)]
            except OSError as exc:
                raise UserError(f"{_where(p, subjects[k] if subjects is not None else None)}: unreadable image "
                                f"({exc.strerror or exc})") from None
            new += 1
        out.append((key, known[ap][4]))
        shown.advance()
    shown.finish()
    if new and folder:
        try:
            os.makedirs(folder, exist_ok=True)
            write_json({"files": dict(sorted(known.items()))}, os.path.join(folder, SOURCES_INDEX))
        except (UserError, OSError) as exc:   # only a saving of time is lost: warn, go on
            warn(f"{exc}; the images' hashes are not remembered and are computed again next time")
    return out


def image_fingerprint(paths, cache_dir=None, subjects=None, progress=False):
    """The images' part of a run's identity: sha256 of every image's file name and content hash, in table order.

    The content is every file's bytes (sha256), read once and remembered in <cache_dir>/sources.json by path and
    file identity (file_key), so a second run costs a stat per image. Stable when the folder is moved or
    copied; re-exported, re-preprocessed, re-ordered or replaced images change it, a same-size replacement with
    its modification time kept included. A missing image is refused naming it."""
    h = hashlib.sha256()
    with cache_lock(cache_dir) if cache_dir else contextlib.nullcontext():   # jobs sharing a cache hash once
        hashes = source_hashes(paths, cache_dir, subjects, progress)
    for k, (p, (_, digest)) in enumerate(zip(paths, hashes)):
        if digest is None:
            raise UserError(f"{_where(p, subjects[k] if subjects is not None else None)}: image file not found")
        h.update(f"{os.path.basename(p)}\t{digest}\n".encode())
    return h.hexdigest()


FLOAT16_MAX = float(np.finfo(np.float16).max)   # 65504


def check_values(volume, path, subject=None):
    """Refuse an image that cannot be a (preprocessed) scan, in either cache dtype: NaN or inf voxels, voxels
    beyond float16's range (+-65504: a wrong scale in the header, or a broken export; a float32 cache would
    train on them, BatchNorm's variance overflowing), or no signal (every voxel the same value: all zeros from
    a failed registration or an empty export)."""
    where = _where(path, subject)
    bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
    if bad:
        raise UserError(f"{where}: {bad} NaN/inf voxels")
    lo, hi = float(volume.min()), float(volume.max())
    if max(-lo, hi) > FLOAT16_MAX:
        n = int(np.count_nonzero(np.abs(volume) > FLOAT16_MAX))
        raise UserError(f"{where}: {n} voxels beyond +-{FLOAT16_MAX:g} (the largest {max(-lo, hi):.3g}), beyond "
                        f"float16's range: a wrong scale in the header or a broken export? Rescale or z-score the "
                        f"image (preprocess.py)")
    if lo == hi:
        raise UserError(f"{where}: no signal: every voxel is {lo:g} (a failed registration or an empty export?)")


def load_volume(path, subject=None, expected_shape=None):
    """Validated float32 (X, Y, Z) array in RAS orientation (see load_nifti), its values those of a scan
    (check_values: within float16's range, not one constant)."""
    data = np.asarray(load_nifti(path, subject).dataobj, dtype=np.float32)
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        raise UserError(f"{_where(path, subject)}: image shape {tuple(data.shape)}, expected {tuple(expected_shape)}")
    check_values(data, path, subject)
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
