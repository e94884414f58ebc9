"""Real data in: the tables (tables.py), the images (images.py), Datasets, ADNIMERGE, previews, the checks.

On-disk format (the synthetic cohorts of synthetic.py use it too, so the demos exercise the real path):
    AD:        a CSV with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4, ABETA, PTAU, TAU, FDG, AV45
               (ADNIMERGE names) and optionally `image` (path relative to the CSV), else
               <image dir>/<Subject>.nii.gz; crops.json with the hippocampus boxes.
    brain age: a CSV with Subject, Age, Sex (M/F) [, image]; images as above.
Every error is a UserError naming the file, subject, line or column. The tables are read by tables.py,
the images read, hashed and cropped by images.py and
cached by imagecache.py; their names are re-exported here, so `data`
stays the one door for data coming in.

Command line (bad input -> one line `error: ...` on stderr, exit status 2):
    python data.py check-ad CSV [--image-dir DIR] [--no-images] [--group-map SMC=CN] [--preview DIR]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
    python data.py from-adnimerge ADNIMERGE.csv --out table.csv [--visit bl] [--group-map SMC=CN]
--preview writes DIR/<name>_boxes.png and _crops.png, <name> the Subject, or for one that is not a plain
file name (`../../x`, from an `image` column) a safe name inside DIR (tables.output_names), printed.
from-adnimerge's table is written verbatim (the code reads it back), not escaped for spreadsheets.
"""
import argparse
import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import numbers
import os
import re
import shlex
import signal
import sys
import threading
import time
import uuid
import warnings
import numpy as np
import zlib
import nibabel as nib
import concurrent.futures
import ctypes
import multiprocessing
import struct
import torch
from sklearn.experimental import enable_iterative_imputer
from sklearn.impute import IterativeImputer
from dataclasses import dataclass


# ---- safeio ------------------------------------------------------------------------------------
# What every script promises at its edges: bad input stops with one `error:` line, and no file is half-written.
#
#     UserError    bad input or a bad request from the user (a table, an image, an option, a run folder);
#                  its message is one line naming the file, row, column or option
#     run_cli      a script's __main__: UserError / OSError -> `error: <one line>` on stderr, exit status 2;
#                  Ctrl-C / SIGTERM -> `interrupted (...)` in one line (what is kept, the command to resume),
#                  exit status 130 / 143 as a shell reports them (128 + the signal's number)
#     atomic_path  write to a temporary name beside the target, rename onto it only when complete; a full disk or
#                  an unwritable folder is a UserError naming the folder and the bytes the file needed
#     write_json, write_csv, write_text, write_bytes   the atomic writers the scripts use (JSON: NaN/inf -> null)
#     spreadsheet_safe  a CSV cell a spreadsheet would run as a formula, made text (write_csv's for_people)
#     check_output  an output file named by an option that is a folder or one of the command's inputs: refused
#     warn         a legitimate but odd input: one `warning:` line on stderr, the run goes on
#     check_number a numeric option within its range, else a UserError naming the option
#     ArgumentParser  argparse's parser whose errors are a UserError too (one line, not usage + error)
#     duration_text  a duration as a person says it: '45 s', '3 min 10 s', '2 h 5 min' (every progress line's)
#     Progress     progress lines of a long job (count, share, pace, time left; a final line), silenced by quiet

class UserError(ValueError):
    """Bad input or a bad request from the user. The message is one line naming the culprit."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`), raised where the process is, like Ctrl-C's KeyboardInterrupt,
    so that the same clean-up runs (files closed, temporary files removed, locks released) and the same line is
    printed."""


def raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main, argv=None, resume_option=None):
    """Run `main(argv)`; a UserError or OSError becomes `error: <one line>` on stderr and exit status 2.

    Ctrl-C (KeyboardInterrupt) and SIGTERM (Terminated) become one `interrupted (Ctrl-C)` / `interrupted
    (SIGTERM)` line, not a traceback: where the run was and what it kept (the exception's `progress`, set by
    training.fit), then the command to resume with (this one, plus `resume_option` for the training scripts,
    `--resume`); exit status 130 for Ctrl-C and 143 for SIGTERM, 128 + the signal as a shell reports them."""
    installed = threading.current_thread() is threading.main_thread()     # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if installed else None
    try:
        return main(argv)
    except BrokenPipeError:   # the reader went away (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's flush finds no pipe
        sys.exit(141)                                                    # 128 + SIGPIPE, as a shell reports it
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.filename}: {exc.strerror or exc}"
        else:
            msg = str(exc)
        print("error: " + " ".join(msg.split()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        args = list(sys.argv[1:] if argv is None else argv)
        if resume_option and resume_option not in args:
            args.append(resume_option)
        progress = getattr(exc, "progress", None)
        command = shlex.join([sys.executable, sys.argv[0], *args])
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:                # one of torchrun's processes
            command = "torchrun <its options> " + shlex.join([sys.argv[0], *args])
        print(f"interrupted ({'SIGTERM' if isinstance(exc, Terminated) else 'Ctrl-C'})"
              + (f" {' '.join(progress.split())}" if progress else "")
              + f"; {'resume' if resume_option else 'run again'} with: {command}", file=sys.stderr, flush=True)
        sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# errors of a write that are the folder's, not the program's: the disk or quota is full, or it cannot be written
DISK_FULL = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT}


def size_text(n):
    """A byte count as '41472 bytes', with MiB / GiB beside it when large."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def write_failure(folder, name, exc, nbytes=None, written=0):
    """The one line of a write into `folder` that the disk or the folder refused (exc: the OSError)."""
    need = size_text(nbytes) if nbytes else f"more than {size_text(written)}" if written else "some space"
    free = ""
    with contextlib.suppress(OSError, AttributeError):
        st = os.statvfs(folder)
        free = f", {size_text(st.f_bavail * st.f_frsize)} free there"
    if exc.errno in DISK_FULL:
        return (f"{folder}: no space left to write {name} ({exc.strerror or exc}): it needs {need}{free}; free "
                f"some space or choose another folder")
    return (f"{folder}: cannot write {name} there ({exc.strerror or exc}); it needs {need}; choose a folder you "
            f"can write to")


@contextlib.contextmanager
def atomic_path(path, nbytes=None):
    """Yield a temporary path next to `path`; os.replace it onto `path` on success, delete it on error.

    The temporary name ends with the final basename, so extension-sniffing writers (nibabel's
    `.nii.gz`, np.save's `.npy`) behave as for the real name. Readers never see a partial file.
    A full disk or quota, or a folder that cannot be written, is a UserError naming the folder and the
    bytes the file needed (`nbytes` when the caller knows them, else more than were written).
    """
    path = os.fspath(path)
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex[:12]}-{base}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        written = 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if exc.errno in DISK_FULL | UNWRITABLE:
            raise UserError(write_failure(d, base, exc, nbytes, written)) from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but an unknown option, a bad choice or a missing argument raises a UserError, so
    under run_cli it is the one `error:` line (argparse would print its usage line first), exit status 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def check_number(option, value, least=None, above=None, most=None):
    """A numeric option (or each of a list of them) finite and within its range, else a UserError naming it.
    least: value >= least; above: value > above; most: value <= most. None values (unset options) pass."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    shown = " ".join(map(str, values))
    for v in values:
        if v is None:
            continue
        if not math.isfinite(v):
            raise UserError(f"{option} {shown}: must be a finite number")
        if least is not None and v < least or above is not None and v <= above or most is not None and v > most:
            want = " and ".join(w for w in (least is not None and f"at least {least}",
                                            above is not None and f"above {above}",
                                            most is not None and f"at most {most}") if w)
            raise UserError(f"{option} {shown}: " + ("each " if len(values) > 1 else "") + f"must be {want}")


def same_file(a, b):
    """Whether writing `a` would replace `b`: the same path, or another spelling of it (a symlinked folder,
    `..`, a case-insensitive file system; a hard link too, to be safe). A symlink `a` does not count: an
    atomic write replaces the link, not what it points to."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    with contextlib.suppress(OSError):
        return not os.path.islink(a) and os.path.samefile(a, b)
    return False


def check_output(option, path, inputs=()):
    """An output file named by `option`: refused when it is a folder, or when writing it would replace one
    of `inputs` (the table, an image, a checkpoint the command reads), see same_file."""
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder; give the file to write")
    for p in inputs:
        if p and same_file(path, p):
            raise UserError(f"{option} {path}: would overwrite {p}, an input of this command; choose another file")


def file_sha256(path):
    """sha256 of a file's bytes, read in 1 MiB blocks (a table's identity, an image's content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def warn(message):
    """A legitimate but odd input (ADNI's missing codes, say): one `warning: ...` line on stderr."""
    print("warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def json_safe(obj):
    """obj with NaN / inf as None (JSON null: a bare NaN is not JSON and strict readers refuse it), numpy
    scalars and arrays as plain numbers and lists, tuples as lists and dict keys as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):   # numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(obj, path):
    """Atomic, strict JSON: non-finite numbers are written as null (json_safe)."""
    write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False), path)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(cell):
    """A text cell that a spreadsheet would run as a formula (it starts with = + - @ tab or carriage return:
    `=HYPERLINK(...)`, `+1+1`, `@SUM(1)`) with a ' in front, so it shows as text (OWASP's advice on CSV
    injection). Numbers (`-4`, `-1.5e3`, and anything not a str) are left as they are. Text that starts
    with ' gets one more, so removing one leading ' from every cell that starts with one gives back
    exactly what was escaped."""
    if isinstance(cell, str) and cell.startswith(FORMULA_START) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def write_csv(rows, columns, path, for_people=False):
    """rows: dicts keyed by column (DictWriter) or lists in column order; UTF-8, as the tables are read.
    for_people: a file for a spreadsheet that this code never reads back (predictions, results): every
    cell and column name through spreadsheet_safe. Tables the code reads back are written verbatim."""
    columns, cell = list(columns), (spreadsheet_safe if for_people else (lambda v: v))
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow([cell(c) for c in columns])
    if rows and isinstance(rows[0], dict):
        csv.DictWriter(buf, fieldnames=columns).writerows({k: cell(v) for k, v in r.items()} for r in rows)
    else:
        csv.writer(buf).writerows([cell(v) for v in r] for r in rows)
    write_text(buf.getvalue(), path, newline="")


def write_text(text, path, newline=None):
    """Atomic; the text is whole before the file is opened, so a full disk is named with the bytes it needed."""
    with atomic_path(path, len(text.encode())) as tmp, open(tmp, "w", newline=newline, encoding="utf-8") as f:
        f.write(text)


def write_bytes(blob, path):
    """Atomic write of bytes (or a buffer: a checkpoint serialised in memory, a cache entry)."""
    blob = memoryview(blob)
    with atomic_path(path, blob.nbytes) as tmp, open(tmp, "wb") as f:
        f.write(blob)


def duration_text(seconds):
    """A duration as a person says it, the one format of every progress line: '0.4 s', '45 s', '3 min 10 s',
    '2 h 5 min' (to a tenth of a second below 10 s, to the second below an hour, to the minute above)."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 else "")
    m = round(s / 60)
    return f"{m // 60} h" + (f" {m % 60} min" if m % 60 else "")


class Progress:
    """Progress of a long job that a person can follow, on stdout as the scripts' other log lines; quiet prints none.

    advance(n): n more of `total` done; a line `<what>: 1200 of 5000 images (24%), 38 images/s, about 1 min 40 s
    left` at most every `every` seconds and every `step` of the work (thousands of items give some twenty lines,
    a few seconds' work none). finish(): `<what>: 5000 images in 2 min 12 s (38 images/s)`, if the job was long
    enough to print a line (or `always`). Time left: the pace so far, elapsed * (total - done) / done, measured
    from rebase() when the start is not the pace (processes starting up).

    Jobs of unequal kinds (run-protocol's runs: a tabular MLP costs far less than an image model) give each item
    a kind (`kinds`, one per item, in any order; `what` is then the verb, "train") and report
    item_done(kind, seconds, label) instead, one line per item: the time
    left is, per kind, the mean duration of its finished items times the items of it still to do; a kind none
    of whose items has finished yet counts as the costliest kind finished so far (an image model is not
    estimated from MLPs), all divided by `parallel` for jobs run that many at a time."""

    def __init__(self, what, total, unit="items", quiet=False, every=5.0, step=0.05, clock=time.monotonic,
                 kinds=None, parallel=1):
        self.what, self.unit, self.quiet, self.every, self.step, self.clock = what, unit, quiet, every, step, clock
        self.kinds, self.parallel, self.seconds = list(kinds or []), parallel, {}   # seconds: {kind: [each's]}
        self.total = len(self.kinds) if kinds is not None else total
        self.done, self.printed = 0, False
        self.t0 = self.last = clock()
        self.base_t, self.base_done, self.last_done = self.t0, 0, 0

    def say(self, line):
        if not self.quiet:
            print(line, flush=True)
            self.printed = True

    def hushed(self):
        """A with-block whose stdout is swallowed when quiet (work run in this process that prints its own lines)."""
        return contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext()

    def rebase(self):
        """The pace from now on (time left after a start-up that the rest of the job will not repeat)."""
        self.base_t, self.base_done = self.clock(), self.done

    def elapsed(self):
        return self.clock() - self.t0

    def left(self, spent=0.0):
        """Seconds still to go at the pace so far (None before the first item); by kind, less `spent` seconds
        that the items in progress have run already."""
        if self.seconds:
            mean = {k: sum(v) / len(v) for k, v in self.seconds.items()}
            return max(0.0, sum(mean.get(k, max(mean.values())) for k in self.kinds) - spent) / self.parallel
        n = self.done - self.base_done
        return (self.clock() - self.base_t) / n * (self.total - self.done) if n > 0 else None

    def pace(self, done, seconds):
        """'38 images/s', '2.5 images/s', '0.04 images/s'."""
        r = done / max(seconds, 1e-9)
        return (f"{r:.0f}" if r >= 10 else f"{r:.1f}" if r >= 1 else f"{r:.2g}") + f" {self.unit}/s"

    def advance(self, n=1):
        self.done += n
        now = self.clock()
        if (now - self.last >= self.every and self.done - self.last_done >= self.step * self.total
                and self.done < self.total and self.left() is not None):
            pace = self.pace(self.done - self.base_done, now - self.base_t)
            self.say(f"{self.what}: {self.done} of {self.total} {self.unit} ({100 * self.done // self.total}%), "
                     f"{pace}, about {duration_text(self.left())} left")
            self.last, self.last_done = now, self.done

    def finish(self, always=False):
        if self.printed or always or self.elapsed() >= self.every:
            self.say(f"{self.what}: {self.done} {self.unit} in {duration_text(self.elapsed())}"
                     + (f" ({self.pace(self.done, self.elapsed())})" if self.done else ""))

    def item_done(self, kind, seconds, label, result="", spent=0.0):
        """One item of `kind` done in `seconds`: `run 7 of 40 done (<label>, 3 min 10 s)<result>; about 2 h 5 min
        left for the 33 still to train` (unit "runs" -> "run"), the last one `...; all 40 in 2 h 5 min`.
        spent: seconds the items still running have run (jobs in parallel), off the time left."""
        self.kinds.remove(kind)
        self.seconds.setdefault(kind, []).append(seconds)
        self.done += 1
        head = f"{self.unit.rstrip('s')} {self.done} of {self.total} done ({label}, {duration_text(seconds)}){result}"
        if self.kinds:
            self.say(f"{head}; about {duration_text(self.left(spent))} left for the {len(self.kinds)} still to "
                     f"{self.what}")
        else:
            self.say(f"{head}; all {self.total} in {duration_text(self.elapsed())}")


# ---- tabular -----------------------------------------------------------------------------------
# The AD tabular record (Sec. 3.3, 4.3.3): attribute names, cell parsing, preprocessing fitted on training rows.
#
# Attributes use ADNIMERGE's column names. A cell is a number, empty or ADNI's code -4 / -1 (missing), or
# a censored CSF value such as `>1700` / `<8` (read as the assay limit); a value outside what the
# attribute can hold (ATTRIBUTE_RANGES) is refused. TabularPreprocessor turns raw rows into the
# model's input: one-hot sex, z-scores, iterative imputation (Sec. 3.3) and missing indicators;
# its state is plain numbers, saved in every checkpoint so a run predicts exactly as it trained.

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


# ---- splits ------------------------------------------------------------------------------------
# The split protocol: five stratified subsets and their folds for AD (Sec. 4.3.4, App. C.1); brain age 80/10/10.
#
# Both deal a shuffled cohort into parts within groups of (sex, diagnosis, age bin), so every part keeps
# the joint distribution; the same seed gives the same split on every machine and in every run.

def _bins(age, n_bins):
    """Equal-width age bins over the known ages; an unknown age (NaN) is a bin of its own (-1), so the
    split never depends on imputation."""
    age = np.asarray(age, np.float64)
    known = np.isfinite(age)
    if not known.any():
        return np.full(len(age), -1)
    edges = np.linspace(age[known].min(), age[known].max(), n_bins + 1)[1:-1]
    return np.where(known, np.digitize(np.where(known, age, 0.0), edges), -1)


def _stratified_order(keys, seed):
    """Shuffle with the seed, then group by the stratification keys (random order within a group)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(keys[0]))
    order = np.lexsort(tuple(np.asarray(k)[perm] for k in reversed(keys)))  # stable: keeps perm inside groups
    return perm[order]


def ad_split(sex, labels, age, seed, n_subsets=5, n_age_bins=20):
    """-> (N,) int64 subset id 0..n_subsets-1 per subject (Sec. 4.3.4).

    Shuffled with `seed`, then dealt round-robin into the subsets within each (sex, diagnosis,
    age bin) group, an unknown sex or age forming groups of their own; the dealing position carries
    over from one group to the next, so the subsets differ in size by at most one and keep the
    joint distribution.
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


BRAIN_AGE_FRACTIONS = (0.8, 0.1, 0.1)  # Sec. 4.2.3


def brain_age_split(age, sex, seed, fractions=None, n_age_bins=20):
    """-> (train_idx, val_idx, test_idx), 80/10/10 (or `fractions`) stratified by sex and age bins (Sec. 4.2.3).

    Same dealing as ad_split, but by quotas: the next subject goes to the part furthest below
    its share so far, so every (sex, age bin) group is cut in the given fractions.
    """
    fractions = BRAIN_AGE_FRACTIONS if fractions is None else fractions
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


# ---- tables ------------------------------------------------------------------------------------
# Tables in: the AD and brain-age CSV tables read and validated, so a bad cell stops the run with its line and column.
#
# A table is refused, in one line naming the file, line, subject or column, when it cannot be what it
# claims: a delimiter other than a comma, a column name given twice, a quote that never closes, a
# Subject that is not a plain file name where it names an image, a value no subject can have (a
# negative biomarker, an age of 300, an APOE4 count of 3, a number beyond 1e6). ADNI's codes -4 and
# -1 in an attribute cell mean "missing": they are read as empty cells, with a warning per column.
# The images a table names are found here (`<image dir>/<Subject>.nii.gz`, else `.nii`); reading
# them is data.py's job.

CLASS_NAMES = ("CN", "MCI", "AD")
GROUP_ALIASES = {"CN": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI", "AD": "AD", "DEMENTIA": "AD"}
IMAGE_SUFFIXES = (".nii.gz", ".nii")


# ----------------------------------------------------------------------------------------------
# Reading a CSV with validation

def table_sha256(csv_path):
    """The table's identity: sha256 of its bytes (stored in checkpoints, so a run is tied to its data)."""
    return file_sha256(csv_path)


def _check_delimiter(csv_path, header):
    """A header with more semicolons or tabs than commas is a table saved with another delimiter."""
    counts = {",": header.count(","), ";": header.count(";"), "\t": header.count("\t")}
    other = max((";", "\t"), key=counts.get)
    if counts[other] > counts[","]:
        name = "semicolon" if other == ";" else "tab"
        raise UserError(f"{csv_path}: the delimiter looks like a {name} ({counts[other]} {name}s, {counts[',']} "
                        f"commas in the header line): save the table comma-separated")


class _CountedLines:
    """A file's lines with a count of those read, so each row's first and last line are known exactly."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self.f)
        self.n += 1
        return line


def read_csv_rows(csv_path, required):
    """-> (list of (line number, row dict), fieldnames). Checks the delimiter, columns (present, not
    repeated), quotes (a cell spanning lines is a quote never closed), field counts and encoding."""
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: table not found")
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            lines = _CountedLines(f)
            reader = csv.reader(lines)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{csv_path}: empty file, no header line")
            fields = [c.strip() for c in header]
            _check_delimiter(csv_path, ",".join(fields))
            seen = {}
            for k, c in enumerate(fields):
                if c and c in seen:
                    raise UserError(f"{csv_path}: column {c} appears twice in the header (columns {seen[c] + 1} "
                                    f"and {k + 1}): rename or remove one")
                seen[c] = k
            missing = [c for c in required if c not in fields]
            if missing:
                raise UserError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            while True:
                start = lines.n + 1
                cells = next(reader, None)
                if cells is None:
                    break
                multi = next((j for j, v in enumerate(cells) if "\n" in v or "\r" in v), None)
                if multi is not None:
                    col = fields[multi] if multi < len(fields) else "(beyond the header)"
                    raise UserError(f"{csv_path} line {start}: a quote opened in column {col} is not closed "
                                    f"before line {lines.n} (cells cannot span lines)")
                if len(cells) > len(fields):
                    raise UserError(f"{csv_path} line {start}: {len(cells)} fields, the header has {len(fields)}")
                row = {k: v.strip() for k, v in zip(fields, cells + [""] * (len(fields) - len(cells)))}
                if any(row.values()):                                  # skip blank lines; short rows: empty cells
                    rows.append((start, row))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable UTF-8 CSV table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise UserError(f"{csv_path}: no data rows")
    return rows, fields


def plain_file_name(name):
    """True when `name` can be used as a file name inside a folder: no path separator, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and \
        os.path.basename(name) == name


_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def output_names(ids):
    """A file name for each id (a Subject, for the files a command writes per subject), all inside the
    folder they are joined to and distinct even on a case-insensitive file system: an id of letters,
    digits and . _ - (not starting with . or -, at most 100 characters) is its own name; any other id
    (`../../x`, `a/b`, spaces, `=HYPERLINK(...)`), and an id equal but for case to an earlier one,
    is mapped to its characters outside that set replaced by _ plus `-` and 8 hex digits of its
    sha1 (`../../x` -> `_.._x-9bdbf20b`), numbered on in the (never seen) case of a clash."""
    names, used = [], set()
    for s in ids:
        name = s if _SAFE_NAME.fullmatch(s) else None
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", s)[:64].lstrip(".-") or "subject"
        tag, k = hashlib.sha1(s.encode()).hexdigest()[:8], 0
        while name is None or name.lower() in used:
            name, k = f"{stem}-{tag}" + (f"-{k}" if k else ""), k + 1
        used.add(name.lower())
        names.append(name)
    return names


def check_subjects(csv_path, rows, as_file_names=False):
    """-> the Subject of every row: filled, unique and, where it names a file, a plain file name of at most
    200 bytes that no earlier subject's equals but for case (on a case-insensitive file system they are
    one file)."""
    subjects, seen, folded = [], {}, {}
    for line, row in rows:
        s = row.get("Subject", "")
        if not s:
            raise UserError(f"{csv_path} line {line}: empty Subject")
        if s in seen:
            raise UserError(f"{csv_path} line {line}: subject {s} repeats line {seen[s]}")
        if as_file_names and not plain_file_name(s):
            raise UserError(f"{csv_path} line {line}: Subject {s!r} is not a plain file name (it names the "
                            f"subject's image file, so it may not hold / or \\ or be . or ..)")
        if as_file_names and len(s.encode()) > 200:    # + `.nii.gz` + the atomic write's `.tmp-` prefix < 255
            raise UserError(f"{csv_path} line {line}: Subject {s[:40]}... is {len(s.encode())} bytes long: as a "
                            f"file name it may have at most 200")
        if as_file_names and s.casefold() in folded:
            other = folded[s.casefold()]
            raise UserError(f"{csv_path} line {line}: Subject {s} differs from subject {other[1]} (line "
                            f"{other[0]}) only in case: as file names they are one file on a case-insensitive "
                            f"file system; rename one")
        seen[s] = line
        folded[s.casefold()] = (line, s)
        subjects.append(s)
    return subjects


def find_image(folder, subject):
    """<folder>/<subject>.nii.gz, else <folder>/<subject>.nii -> the path, or None when neither exists."""
    for suffix in IMAGE_SUFFIXES:
        p = os.path.join(folder, subject + suffix)
        if os.path.isfile(p):
            return p
    return None


def _image_paths(csv_path, rows, fields, subjects, image_dir, need):
    """Image path per subject: the `image` column (relative to the CSV) or <image_dir>/<Subject>.nii[.gz]."""
    if not need:
        return None
    base = os.path.dirname(os.path.abspath(csv_path))
    if image_dir is not None and not os.path.isdir(image_dir):
        raise UserError(f"--image-dir {image_dir}: folder not found")
    image_dir = image_dir if image_dir is not None else os.path.join(base, "images")
    paths, seen = [], {}
    for (line, row), subj in zip(rows, subjects):
        if "image" in fields and row.get("image"):
            p = os.path.join(base, row["image"])
            if not os.path.isfile(p):
                raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: {p}")
        else:
            if not plain_file_name(subj):
                raise UserError(f"{csv_path} line {line}: Subject {subj!r} is not a plain file name, so it cannot "
                                f"name an image in {image_dir} (give the path in an `image` column)")
            p = find_image(image_dir, subj)
            if p is None:
                raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: "
                                f"{os.path.join(image_dir, subj)}.nii.gz (or .nii)")
        st = os.stat(p)     # one file, whatever the spelling: a symlink, a hard link, a case-insensitive system
        other = seen.setdefault((st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(p), (subj, line))
        if other != (subj, line):   # one scan under two subjects could sit in training and test at once
            raise UserError(f"{csv_path} line {line}: subject {subj}: image {p} is also subject {other[0]}'s "
                            f"(line {other[1]})")
        paths.append(p)
    return paths


def number_cell(csv_path, line, row, col, required, codes=None):
    """A numeric cell, validated: AD attributes by parse_attribute (range, ADNI missing codes, counted
    in `codes`), others (brain age's Age) as a number within 0-120 when the column is an age."""
    where = f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}"
    try:
        if col in AD_CONTINUOUS:
            if codes is not None and is_missing_code(row.get(col, "")):
                codes[col] = codes.get(col, 0) + 1
            v = parse_attribute(col, row.get(col, ""))
        else:
            v = parse_value(row.get(col, ""))
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    if required and math.isnan(v):
        raise UserError(f"{where} is empty")
    if col == "Age" and not math.isnan(v) and not 0 <= v <= 120:
        raise UserError(f"{where}: implausible age {row.get(col)!r} (expected 0-120 years)")
    return v


# ----------------------------------------------------------------------------------------------
# The AD table (Sec. 4.3.1, 4.3.3)

@dataclass
class ADTable:
    """The AD cohort as read from the CSV. `raw` rows feed TabularPreprocessor."""
    subjects: list
    labels: np.ndarray      # (N,) int64, index into class_names; -1 = no diagnosis (prediction tables only)
    raw: list               # (N,) dicts attribute -> cell text, for AD_ATTRIBUTES
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female, -1 = unknown (empty cell)
    age: np.ndarray         # (N,) float32, NaN = unknown (empty cell)
    image_paths: list       # (N,) str, or None when need_images=False
    csv_path: str
    class_names: tuple = CLASS_NAMES
    skipped: dict = None    # {Group value: rows skipped}, "" for an empty Group
    missing_codes: dict = None  # {attribute: cells holding ADNI's -4 / -1, read as missing}


def parse_group_map(pairs):
    """--group-map SMC=CN X=AD -> {"SMC": "CN", "X": "AD"} (keys upper-case; targets must be diagnoses)."""
    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        target = GROUP_ALIASES.get(value.strip().upper())
        if not sep or not key.strip() or target is None:
            raise UserError(f"--group-map {p}: expected VALUE=DIAGNOSIS with DIAGNOSIS one of CN, MCI, AD")
        out[key.strip().upper()] = target
    return out


def diagnosis(group, group_map=None):
    """A Group cell -> "CN", "MCI", "AD" or None (unknown or empty): --group-map first, then the aliases."""
    g = group.strip().upper()
    return (group_map or {}).get(g) or GROUP_ALIASES.get(g)


def read_ad_table(csv_path, image_dir=None, need_images=True, classes=3, group_map=None, for_prediction=False):
    """Read and validate an ADNIMERGE-like AD table (SPEC Sec. 3, paper Sec. 4.3.1, 4.3.3).

    Only Subject and Group must be filled: any attribute cell may be empty (imputed, Sec. 3.3), AGE
    and PTGENDER included. Rows whose Group is empty or not a diagnosis (ADNI's SMC, say) are
    skipped and counted in `skipped`, unless --group-map names them; with classes=2 the MCI rows are
    left out. for_prediction: Group is optional and no row is left out (label -1 where unknown).
    ADNI's missing-value codes -4 and -1 read as empty cells, with one warning per column.
    Line numbers in errors are CSV line numbers (the header is line 1).
    """
    if classes not in (2, 3):
        raise UserError(f"classes must be 2 (CN vs AD) or 3, got {classes}")
    names = CLASS_NAMES if classes == 3 else ("CN", "AD")
    required = ("Subject",) + (() if for_prediction else ("Group",)) + AD_ATTRIBUTES
    rows, fields = read_csv_rows(csv_path, required)
    keep, labels, sexes, ages, skipped, codes = [], [], [], [], {}, {}
    for line, row in rows:
        g = diagnosis(row.get("Group", ""), group_map)
        if g is None and not for_prediction:
            skipped[row["Group"]] = skipped.get(row["Group"], 0) + 1
            continue
        cell = row["PTGENDER"]
        if is_missing_code(cell):
            codes["PTGENDER"] = codes.get("PTGENDER", 0) + 1
            cell = ""
        sx = SEX_CODES.get(cell.lower(), -1 if not cell else None)
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column PTGENDER: "
                            f"expected Male or Female, got {cell!r}")
        age = number_cell(csv_path, line, row, "AGE", required=False, codes=codes)
        for col in AD_CONTINUOUS[1:]:   # validated now, parsed by the preprocessor
            number_cell(csv_path, line, row, col, required=False, codes=codes)
        if classes == 2 and g == "MCI" and not for_prediction:
            continue
        keep.append((line, row))
        labels.append(names.index(g) if g in names else -1)
        sexes.append(sx)
        ages.append(age)
    if not keep:
        seen = ", ".join(f"{k or '(empty)'} {n}" for k, n in skipped.items())
        raise UserError(f"{csv_path}: no {' or '.join(names)} subjects" + (f" (Group values: {seen}; "
                        f"map them with --group-map VALUE=CN|MCI|AD)" if seen else ""))
    for col in AD_ATTRIBUTES:
        if codes.get(col):
            cells = f"{codes[col]} cell{'s hold' if codes[col] > 1 else ' holds'}"
            warn(f"{csv_path}: column {col}: {cells} ADNI's missing-value code -4 or -1, read as missing")
    subjects = check_subjects(csv_path, keep)
    paths = _image_paths(csv_path, keep, fields, subjects, image_dir, need_images)
    raw = [{a: row[a] for a in AD_ATTRIBUTES} for _, row in keep]
    return ADTable(subjects, np.array(labels, np.int64), raw, np.array(sexes, np.int64),
                   np.array(ages, np.float32), paths, os.fspath(csv_path), names, skipped, codes)


def skipped_summary(table):
    """'' or a line saying which Group values were skipped, for the scripts to print."""
    if not table.skipped:
        return ""
    n = sum(table.skipped.values())
    return (f"{table.csv_path}: skipped {n} row{'s' * (n > 1)} whose Group is not CN, MCI or AD: "
            + ", ".join(f"{k or '(empty)'} {v}" for k, v in sorted(table.skipped.items()))
            + " (map them with --group-map VALUE=CN|MCI|AD)")


# ----------------------------------------------------------------------------------------------
# The brain-age table (Sec. 4.2.1)

@dataclass
class BrainAgeTable:
    subjects: list
    age: np.ndarray         # (N,) float32, years
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female
    image_paths: list       # (N,) str, or None
    csv_path: str


def read_brain_age_table(csv_path, image_dir=None, need_images=True, for_prediction=False):
    """Read and validate a brain-age table: Subject, Age, Sex (M/F) [, image] (Sec. 4.2.1).
    for_prediction: Age is optional (NaN where absent or empty); Sex, which conditions the model, is not."""
    rows, fields = read_csv_rows(csv_path, ("Subject", "Sex") if for_prediction else ("Subject", "Age", "Sex"))
    ages, sexes = [], []
    for line, row in rows:
        ages.append(number_cell(csv_path, line, row, "Age", required=not for_prediction))
        sx = SEX_CODES.get(row["Sex"].lower())
        if sx is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column Sex: "
                            f"expected M or F, got {row['Sex']!r}")
        sexes.append(sx)
    subjects = check_subjects(csv_path, rows)
    paths = _image_paths(csv_path, rows, fields, subjects, image_dir, need_images)
    return BrainAgeTable(subjects, np.array(ages, np.float32), np.array(sexes, np.int64), paths, os.fspath(csv_path))


# ---- images ------------------------------------------------------------------------------------
# Images in: NIfTI volumes read and validated, their content hashes, the hippocampus crops.
#
#     load_nifti / load_volume   a NIfTI read with validation (missing, truncated, not 3D, a degenerate affine,
#                                NaN / inf, values beyond float16's range, no signal), RAS float32
#     image_geometry, check_image_geometry   shape and voxel size from the headers alone, one per cohort
#     source_hashes, image_fingerprint       sha256 of the images' bytes, remembered in <cache>/sources.json
#     HippocampusCrops           the two boxes around the hippocampi (Sec. 3.5.2), crops.json
# Every error is a UserError naming the file and subject. The decode-once cache of these images is
# imagecache.py. data.py re-exports both (the one door for data coming in); nothing here imports torch, so the
# decoding processes start in a second.

try:
    import fcntl
except ImportError:  # not on Windows: cache_lock then locks nothing
    fcntl = None



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


# ---- decoding ----------------------------------------------------------------------------------
# The image cache's decoding processes: started, fed, stopped, and never outliving their parent.
#
#     decoding_processes(cache, workers)   `workers` spawned processes that decode entries of `cache`; leaving
#                                          the block by an exception (Ctrl-C, a bad image) stops them at once
#     decode(pool, items, workers)         the items, each yielded once its entry is written, in order
#     stop_signals_interrupt()             meanwhile SIGTERM interrupts this process as Ctrl-C does
#     removed_if_stopped(tmp)              the file a decoding process writes meanwhile, removed if it is stopped
# A decoding process ignores Ctrl-C (its parent stops it), removes the file it was writing when stopped, and
# ends when its parent ends, by any signal, kill -9 included. imagecache.ImageCache uses this; it imports
# nothing of this repository and no torch, so a process starts in a second.

@contextlib.contextmanager
def decoding_processes(cache, workers):
    """A pool of `workers` processes (spawned, so nothing of the parent's threads is inherited), each holding
    `cache`. Leaving the block by an exception stops them now (each removes the file it was writing); leaving it
    normally waits for them."""
    pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                  initializer=_decoding_process_start, initargs=(cache, os.getpid()))
    try:
        yield pool
    except BaseException:
        _stop_now(pool)
        raise
    finally:
        pool.shutdown()


def decode(pool, items, workers):
    """Hand `items` to the pool in chunks -> the items, in order, each once its entry is written."""
    size = max(1, min(16, len(items) // (4 * workers)))
    with _sigint_ignored():            # the processes start ignoring Ctrl-C: this one stops them
        futures = [pool.submit(_decode_held, items[s:s + size]) for s in range(0, len(items), size)]
    return (i for f in futures for i in f.result())


@contextlib.contextmanager
def stop_signals_interrupt():
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
def removed_if_stopped(tmp):
    """Meanwhile `tmp` is the file this process is writing: a decoding process stopped now removes it."""
    _writing.append(tmp)
    try:
        yield
    finally:
        _writing.remove(tmp)


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
        cache.decode(i)
    return items


# ---- imagecache --------------------------------------------------------------------------------
# The decode-once image cache: every image decoded once, then served memory-mapped.
#
#     ImageCache                 a cohort's images, each decoded once (validated, cropped, in float16 or float32)
#                                into an entry of the cache folder, in parallel processes when there are many
#                                (decoding.py); prepare() before training, then items as read-only memmaps
#     entry_bytes, entry_problem the entry format: the .npy file plus a trailer saying what it was decoded from
#                                (the source's sha256, the path, dtype and crop) and a checksum of its data bytes
# An entry that is damaged, truncated or of another version of its image is decoded again, never served. The
# reading, hashing and cropping of the images is images.py; data.py re-exports this (the one door for data
# coming in).

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
        when it is long (Progress: `decoding the image cache: 1200 of 5000 images (24%), 38 images/s, about
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



def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    sex = np.asarray(sex, np.int64)
    return np.eye(2, dtype=np.float32)[sex]


# ----------------------------------------------------------------------------------------------
# Datasets

def image_tensor(array):
    """A copy of an image as a tensor in float16 when it is stored so (the image cache's default), else in float32.
    Loaders ship the stored float16 (half the pinned memory, the shared memory of the workers and the bus) and
    training.to_device upcasts on the device; float16 -> float32 is exact, so the network sees the same numbers."""
    return torch.from_numpy(np.array(array, np.float16 if array.dtype == np.float16 else np.float32))


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
            img = image_tensor(pair[side])[None]                                    # (1, D, H, W)
        else:
            img = image_tensor(pair)[:, None]                                       # (2, 1, D, H, W)
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
        return image_tensor(self.images[i])[None], self.tabular[i], self.age[i]


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
# Previews: see the hippocampus boxes before training for days (evaluate.write_png: matplotlib's imsave when
# installed, else the standard library's zlib)

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

def _check_images(paths, subjects, quiet=False):
    """Every image's header (one shape, one voxel size), then every image decoded and validated, with progress
    lines when it is long (Progress, none when quiet). -> the shape."""
    shape, shown = None, Progress("checking the images", len(paths), "images", quiet)
    check_image_geometry(paths, subjects)
    for p, s in zip(paths, subjects):
        sh = load_volume(p, s, expected_shape=shape).shape
        shape = shape or sh
        shown.advance()
    shown.finish()
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
        sp.add_argument("--quiet", action="store_true", help="no progress lines: the summary, warnings and errors")
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
        shape = _check_images(t.image_paths, t.subjects, a.quiet) if t.image_paths else None
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
        shape = _check_images(t.image_paths, t.subjects, a.quiet) if t.image_paths else None
        print(f"ok: {a.csv}: {len(t.subjects)} subjects, {int((t.sex == 0).sum())} male, age "
              f"{t.age.mean():.1f} +- {t.age.std():.1f} ({t.age.min():.0f}-{t.age.max():.0f})"
              + (f", images {shape}" if shape else ""))


# ---- PNG files (matplotlib when installed, else the standard library)

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



if __name__ == "__main__":
    run_cli(main)
