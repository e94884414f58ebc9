"""The decode-once image cache: every image decoded once, then served memory-mapped.

    ImageCache                 a cohort's images, each decoded once (validated, cropped, in float16 or float32)
                               into an entry of the cache folder, in parallel processes when there are many
                               (decoding.py); prepare() before training, then items as read-only memmaps
    entry_bytes, entry_problem the entry format: the .npy file plus a trailer saying what it was decoded from
                               (the source's sha256, the path, dtype and crop) and a checksum of its data bytes
An entry that is damaged, truncated or of another version of its image is decoded again, never served. The
reading, hashing and cropping of the images is images.py; data.py re-exports this (the one door for data
coming in).
"""
import contextlib
import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np

from decoding import decode, decoding_processes, removed_if_stopped, stop_signals_interrupt
from images import (CACHE_WAY_OUT, PROGRESS_EVERY, file_key, read_sources, cache_lock, load_volume,
                    make_cache_folder, source_hashes)
from safeio import Progress, UserError, atomic_path, warn


ENTRY_MAGIC = b"HFcache1"   # the last 8 bytes of a cache entry, after its trailer and the trailer's length


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


def entry_problem(out, expected_dtype, config, source, whole=True):
    """Why the file `out` is not a sound entry (a phrase), or None: it must be whole (header, size, trailer), hold
    `expected_dtype` decoded under `config` from the source whose sha256 source() returns now, and, with whole,
    its data bytes must match their checksum (else only its header, size and trailer are read)."""
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
            if dtype != np.dtype(expected_dtype) or fortran or meta.get("config") != config:
                return f"decoded for another path, dtype or crop ({meta.get('config')!r})"
            if meta.get("source_sha256") != source():
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
            self._index = read_sources(self.cache_dir)
        found = source_hashes([self.paths[i] for i in indices], self.cache_dir, [self.names[i] for i in indices],
                              progress, known=self._index, every=self.PROGRESS_EVERY)
        for i, held in zip(indices, found):
            self._sources[self.paths[i]] = held

    def source(self, i):
        """sha256 of item i's source file as it is now (None when missing): the remembered hash, unless the
        file's size, mtime, ctime or inode changed since it was hashed."""
        try:
            key = file_key(os.stat(self.paths[i]))
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
        """Why the file `out` is not a sound entry of item i (a phrase), or None (entry_problem)."""
        return entry_problem(out, self.dtype, self.config(i), lambda: self.source(i), whole)

    def decode(self, i):
        """Decode item i into its entry now (validated, transformed, with its trailer), replacing the entries of
        older versions of its source; written whole or not at all (atomic_path)."""
        out, source = self.entry(i), self.source(i)
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
                with removed_if_stopped(tmp), open(tmp, "wb") as f:
                    f.write(blob)
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
                self.decode(i)
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
        with this one, however it ends (kill -9 included: decoding.py); Ctrl-C or SIGTERM
        meanwhile stops them, keeps the entries decoded so far and is one line (a UserError), not a traceback.
        Processes that share the cache (run-protocol --jobs) take turns: the first decodes, the others
        then find its entries (`lock`)."""
        with stop_signals_interrupt():
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
        parallel = workers > 1 and len(todo) >= self.PARALLEL_FROM
        shown = Progress("decoding the image cache" + (f" with {workers} processes" if parallel else ""), len(todo),
                         "images", quiet=not progress, every=self.PROGRESS_EVERY)
        try:
            with decoding_processes(self, workers) if parallel else contextlib.nullcontext() as pool:
                done = decode(pool, todo, workers) if parallel else (self.decode(i) for i in todo)
                for k, _ in enumerate(done, start=1):
                    shown.advance()
                    if parallel and k == 1:
                        shown.rebase()        # time left from the pace once the processes have started
            if parallel:                      # (the processes decoded on their own copies of this object)
                self.n_decoded += len(todo)
                self._checked.update(self.entry(i) for i in todo)
            shown.finish()
        except KeyboardInterrupt:             # the processes are stopped by now (decoding_processes)
            kept = sum(os.path.exists(self.entry(i)) for i in todo)
            raise UserError(f"interrupted while decoding the image cache {self.cache_dir}: {kept} of {len(todo)} "
                            f"images decoded and kept, no process left; the same command decodes the "
                            f"rest") from None

    def lock(self):
        """cache_lock of this cache's folder."""
        return cache_lock(self.cache_dir)

    PARALLEL_FROM = 200  # below this many entries, starting the processes costs more than it saves
    PROGRESS_EVERY = PROGRESS_EVERY  # seconds at least between two progress lines (hashing, checking, decoding)
