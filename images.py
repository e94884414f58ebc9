"""Images in: NIfTI volumes read and validated, their content hashes, the hippocampus crops, the decode-once cache.

    load_nifti / load_volume   a NIfTI read with validation (missing, truncated, not 3D, a degenerate affine,
                               NaN / inf, values beyond float16's range, no signal), RAS float32
    image_geometry, check_image_geometry   shape and voxel size from the headers alone, one per cohort
    source_hashes, image_fingerprint       sha256 of the images' bytes, remembered in <cache>/sources.json
    HippocampusCrops           the two boxes around the hippocampi (Sec. 3.5.2), crops.json
    ImageCache                 every image decoded once (in parallel processes that end with their parent),
                               entries that carry what they were decoded from and a checksum
Every error is a UserError naming the file and subject. data.py re-exports all of it (the one door for data
coming in); nothing here imports torch, so the decoding processes start in a second.
"""
import concurrent.futures
import contextlib
import ctypes
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import struct
import sys
import threading
import time
import zlib

try:
    import fcntl
except ImportError:  # not on Windows: cache_lock then locks nothing
    fcntl = None
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from safeio import Progress, UserError, atomic_path, file_sha256, warn, write_json

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


SOURCES_INDEX = "sources.json"   # in a cache folder: the images' content hashes, by path and file identity


def _file_key(st):
    """What identifies one version of a file without reading it: size, mtime, ctime and inode. ctime cannot be set
    back (os.utime sets only atime and mtime), so a file replaced by one of the same size whose old mtime was kept
    (a copy that preserves times) still has another key."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_sources(folder):
    """{absolute path: [size, mtime_ns, ctime_ns, inode, sha256]} of <folder>/sources.json; {} if absent or damaged
    (it is only remembered hashes: anything unreadable is hashed again)."""
    try:
        with open(os.path.join(folder, SOURCES_INDEX)) as f:
            held = json.load(f)["files"]
        return {k: v for k, v in held.items() if isinstance(v, list) and len(v) == 5}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def source_hashes(paths, folder=None, subjects=None, progress=False, known=None):
    """sha256 of every file's bytes -> [(file key, sha256)] in order (a missing file: (None, None)).

    Remembered in <folder>/sources.json by absolute path and file key (_file_key), so a second call reads no
    image; `known` (such a dict, updated in place) saves reading the index again. Without a folder nothing
    is remembered."""
    known = _read_sources(folder) if known is None and folder else ({} if known is None else known)
    out, new = [], 0
    shown = Progress("hashing the images", len(paths), "images", quiet=not progress, every=ImageCache.PROGRESS_EVERY)
    for k, p in enumerate(paths):
        ap = os.path.abspath(p)
        try:
            key = _file_key(os.stat(ap))
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
    file identity (_file_key), so a second run costs a stat per image. Stable when the folder is moved or
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


# ----------------------------------------------------------------------------------------------
# Decode-once image cache

def cache_folder(cache_dir, data_csv):
    """Where decoded images are cached: --cache-dir, else <csv folder>/cache."""
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "cache")


ENTRY_MAGIC = b"HFcache1"   # the last 8 bytes of a cache entry, after its trailer and the trailer's length


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


def entry_bytes(arr, source_sha256, config):
    """One cache entry: the .npy file of `arr` (np.save's bytes), then a JSON trailer recording what it was
    decoded from (the source file's sha256 and the config: path, dtype, transform) and the CRC-32 of its
    data bytes, the trailer's length (4 bytes) and ENTRY_MAGIC. np.load reads it as the plain .npy."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    meta = json.dumps({"source_sha256": source_sha256, "config": config, "data_crc32": zlib.crc32(arr),
                       "data_bytes": int(arr.nbytes)}, sort_keys=True).encode()
    buf.write(meta + struct.pack("<I", len(meta)) + ENTRY_MAGIC)
    return buf.getbuffer()


class ImageCache:
    """NIfTI decoded once into `cache_dir/<subject>-<config>-<source>.npy`, then served memory-mapped.

    config hashes the source path, the dtype and the transform's cache_key() (or repr); source is the
    source file's content hash (sha256 of its bytes, remembered in cache_dir/sources.json by path and
    file identity, see source_hashes). Every entry carries what it was decoded from (that hash and the
    config) and a checksum of its data bytes (entry_bytes); one that does not match, or is damaged or
    truncated, is decoded again with one `warning:` line, never served. An edited or replaced source
    or a different transform is never served stale; a re-decode replaces the entry it supersedes,
    other configs are kept. Items are read-only memmaps: memory is bounded by what the batches touch,
    not by the cohort. Every image is validated on decode (load_nifti, check_values) and, if given,
    against expected_shape.
    """

    def __init__(self, paths, cache_dir, dtype="float16", transform=None, expected_shape=None, names=None):
        if dtype not in ("float16", "float32"):
            raise UserError(f"cache dtype must be float16 or float32, got {dtype!r}")
        self.paths = [os.path.abspath(p) for p in paths]
        self.names = list(names) if names is not None else [os.path.basename(p).split(".")[0] for p in paths]
        self.cache_dir, self.dtype, self.transform = cache_dir, dtype, transform
        self.expected_shape = expected_shape
        self.n_decoded = 0  # decodes done by this object (tests check the cache is used)
        self._index = None  # sources.json as read (then kept up to date) by this object
        self._sources = {}  # path -> (file key, sha256) of the version of the file last hashed
        self._checked = set()  # entries this object has read whole and found sound (or written itself)
        make_cache_folder(cache_dir)

    def __len__(self):
        return len(self.paths)

    def config(self, i):
        """What item i's entry is decoded from besides the source's bytes: its path, the dtype and the transform."""
        t = self.transform
        tkey = "" if t is None else (t.cache_key() if hasattr(t, "cache_key") else repr(t))
        return f"{self.paths[i]}|{self.dtype}|{tkey}"

    def _hash(self, indices, progress=False):
        """Hash the sources of `indices` whose files changed since (or were never hashed)."""
        if self._index is None:
            self._index = _read_sources(self.cache_dir)
        found = source_hashes([self.paths[i] for i in indices], self.cache_dir, [self.names[i] for i in indices],
                              progress, known=self._index)
        for i, held in zip(indices, found):
            self._sources[self.paths[i]] = held

    def source(self, i):
        """sha256 of item i's source file as it is now (None when missing): the remembered hash, unless the
        file's size, mtime, ctime or inode changed since it was hashed."""
        try:
            key = _file_key(os.stat(self.paths[i]))
        except OSError:
            return None
        if self._sources.get(self.paths[i], (None,))[0] != key:
            self._hash([i] if self._sources else range(len(self)))     # the first time, all (one index write)
        return self._sources[self.paths[i]][1]

    def entry(self, i):
        """Cache file `<subject>-<config hash>-<source content hash>.npy` of item i."""
        conf = hashlib.sha1(self.config(i).encode()).hexdigest()[:10]
        stamp = (self.source(i) or "0" * 10)[:10]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.names[i])[:64]
        return os.path.join(self.cache_dir, f"{safe}-{conf}-{stamp}.npy")

    def problem(self, i, out, whole=True):
        """Why the file `out` is not a sound entry of item i (a phrase), or None. whole: its data bytes are read
        and checked against their checksum too (else only its header, size and trailer)."""
        try:
            with open(out, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                size = f.seek(0, os.SEEK_END)
                if size < offset + nbytes + 12:
                    return f"truncated ({size} bytes, at least {offset + nbytes + 12} expected)"
                f.seek(size - 12)
                n, magic = struct.unpack("<I8s", f.read(12))
                if magic != ENTRY_MAGIC or size != offset + nbytes + n + 12:
                    return "no checksum trailer (damaged, or not written by this version)"
                f.seek(offset + nbytes)
                meta = json.loads(f.read(n))
                if dtype != np.dtype(self.dtype) or fortran or meta.get("config") != self.config(i):
                    return f"decoded for another path, dtype or crop ({meta.get('config')!r})"
                if meta.get("source_sha256") != self.source(i):
                    return "decoded from another version of the image"
                if whole:
                    f.seek(offset)
                    crc, left = 0, nbytes
                    while left:
                        block = f.read(min(left, 1 << 22))
                        if not block:
                            return "truncated"
                        crc, left = zlib.crc32(block, crc), left - len(block)
                    if crc != meta.get("data_crc32"):
                        return "its data bytes do not match their checksum (damaged)"
        except (OSError, ValueError, EOFError, struct.error, TypeError, AttributeError) as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"
        return None

    def _decode(self, i, out):
        source = self.source(i)
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
        blob = entry_bytes(arr, source, self.config(i))
        try:
            with atomic_path(out, blob.nbytes) as tmp:
                _writing.append(tmp)            # a decoding process that is stopped removes it (_stop_decoding)
                try:
                    with open(tmp, "wb") as f:
                        f.write(blob)
                finally:
                    _writing.remove(tmp)
        except UserError as exc:                # a full or read-only cache folder: the way out
            raise UserError(f"{exc} ({CACHE_WAY_OUT})") from None
        self._checked.add(out)
        self.n_decoded += 1

    def __getitem__(self, i):
        out = self.entry(i)
        if out not in self._checked:
            problem = self.problem(i, out) if os.path.exists(out) else "missing"
            if problem != "missing" and problem:
                warn(f"cache entry {out} (subject {self.names[i]}): {problem}; decoded again")
            if problem:
                self._decode(i, out)
            self._checked.add(out)
        return np.load(out, mmap_mode="r")

    def prepare(self, progress=True, workers=1):
        """Hash the sources, check every entry (read whole: header, trailer, checksum) and decode every missing,
        damaged or mismatched one now (one `warning:` line names those that were there), printing progress
        when it is long (safeio.Progress: `decoding the image cache: 1200 of 5000 images (24%), 38 images/s, about
        1 min 40 s left` every PROGRESS_EVERY seconds and 5% at most, then the count and the time taken).

        workers > 1 and at least PARALLEL_FROM entries to decode: that many processes decode them
        (spawned, so nothing of the parent's threads is inherited); each entry is the same file, byte
        for byte, as a serial decode writes (the same decode, bytes and atomic rename). The processes end
        with this one, however it ends (kill -9 included: _decoding_process_start); Ctrl-C or SIGTERM
        meanwhile stops them, keeps the entries decoded so far and is one line (a UserError), not a traceback.
        Processes that share the cache (run-protocol --jobs) take turns: the first decodes, the others
        then find its entries (`lock`)."""
        with _stop_signals_interrupt():
            try:
                with self.lock():
                    todo, damaged = self._check_all(progress)
                    if damaged:
                        warn(f"cache {self.cache_dir}: {len(damaged)} entr{'y' if len(damaged) == 1 else 'ies'} "
                             f"damaged or not of their image, decoded again: " + "; ".join(damaged[:5])
                             + (f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""))
                    self._decode_all(todo, progress, workers)
            except KeyboardInterrupt:   # (an interrupted decode says more, in _decode_all)
                raise UserError(f"interrupted while checking the image cache {self.cache_dir}; nothing was "
                                f"changed, no process left") from None
        return self

    def _check_all(self, progress):
        """-> (items to decode, "<subject> (<why>)" of those whose entry was there but not sound)."""
        self._hash(range(len(self)), progress)
        todo, damaged = [], []
        shown = Progress("checking the image cache", len(self), "entries", quiet=not progress,
                         every=self.PROGRESS_EVERY)
        for i in range(len(self)):
            out = self.entry(i)
            shown.advance()
            if out in self._checked:
                continue
            problem = self.problem(i, out) if os.path.exists(out) else "missing"
            if problem:
                todo.append(i)
                if problem != "missing":
                    damaged.append(f"{self.names[i]} ({problem})")
            else:
                self._checked.add(out)
        shown.finish()
        return todo, damaged

    def _decode_all(self, todo, progress, workers):
        pool, parallel = None, workers > 1 and len(todo) >= self.PARALLEL_FROM
        shown = Progress("decoding the image cache" + (f" with {workers} processes" if parallel else ""), len(todo),
                         "images", quiet=not progress, every=self.PROGRESS_EVERY)
        try:
            if parallel:
                pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                              initializer=_decoding_process_start,
                                                              initargs=(self, os.getpid()))
                size = max(1, min(16, len(todo) // (4 * workers)))
                with _sigint_ignored():            # the processes start ignoring Ctrl-C: this one stops them
                    futures = [pool.submit(_decode_held, todo[s:s + size]) for s in range(0, len(todo), size)]
                done = (i for f in futures for i in f.result())        # in order, as they finish
            else:
                done = (self._decode(i, self.entry(i)) for i in todo)
            for k, _ in enumerate(done, start=1):
                shown.advance()
                if pool is not None and k == 1:
                    shown.rebase()            # time left from the pace once the processes have started
            if pool is not None:
                self.n_decoded += len(todo)
                self._checked.update(self.entry(i) for i in todo)
            shown.finish()
        except BaseException as exc:
            if pool is not None:              # interrupted, or a bad image in one process: stop the others now
                _stop_now(pool)
                pool = None
            if isinstance(exc, KeyboardInterrupt):
                kept = sum(os.path.exists(self.entry(i)) for i in todo)
                raise UserError(f"interrupted while decoding the image cache {self.cache_dir}: {kept} of {len(todo)} "
                                f"images decoded and kept, no process left; the same command decodes the "
                                f"rest") from None
            raise
        finally:
            if pool is not None:
                pool.shutdown()

    def lock(self):
        """cache_lock of this cache's folder."""
        return cache_lock(self.cache_dir)

    PARALLEL_FROM = 200  # below this many entries, starting the processes costs more than it saves
    PROGRESS_EVERY = 5.0  # seconds at least between two progress lines (hashing, checking, decoding)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """Meanwhile SIGTERM raises KeyboardInterrupt in this process, as Ctrl-C does, so that a decode stopped either
    way stops its processes and says so in one line (only in the main thread, where handlers can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored meanwhile (in the main thread): processes started now inherit that, so a Ctrl-C in the
    terminal, which reaches the whole process group, is this process's to handle, not a traceback in each."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)


def _stop_now(pool):
    """Stop a pool's processes now (SIGTERM: each removes the file it was writing). The pool sees them end,
    marks what they had left failed and ends the rest (no future is cancelled first: Python 3.11's pool
    then fails in its own thread); shutdown waits for that."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()
    pool.shutdown(wait=True)


_held = {}  # the ImageCache a decoding process works for (set once per process by _decoding_process_start)
_writing = []  # the temporary file this process is writing now, if any


def _decoding_process_start(cache, parent):
    """Set up one decoding process: it holds `cache`, leaves Ctrl-C to its parent (which stops it), removes
    the file it was writing when stopped (SIGTERM), and ends when its parent does, by any signal, kill -9
    included (Linux: prctl(PR_SET_PDEATHSIG); elsewhere a thread watching os.getppid())."""
    _held["cache"] = cache
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_decoding)
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:      # the parent died before the signal was armed
        _stop_decoding()


def _watch_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _stop_decoding(signum=None, frame=None):
    for tmp in list(_writing):
        with contextlib.suppress(OSError):
            os.remove(tmp)
    os._exit(1)


def _decode_held(items):
    """Decode items of the cache this process holds -> those items."""
    cache = _held["cache"]
    for i in items:
        cache._decode(i, cache.entry(i))
    return items
