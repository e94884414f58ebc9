"""Data in and out: the scripts' edges, the tabular record, the splits, the tables, the images and their cache.

On disk (synthetic.py writes its cohorts so too): AD, a CSV with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4,
ABETA, PTAU, TAU, FDG, AV45 (ADNIMERGE's names) [, image: a path relative to the CSV, else
<image dir>/<Subject>.nii.gz or .nii] and crops.json, the hippocampus boxes; brain age, Subject, Age, Sex [, image].

    python data.py check-ad CSV [--image-dir DIR] [--no-images] [--group-map SMC=CN] [--preview DIR]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
    python data.py from-adnimerge ADNIMERGE.csv --out table.csv [--visit bl] [--group-map SMC=CN]
"""
import argparse
import collections
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
import struct
import sys
import threading
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (makes IterativeImputer importable)
from sklearn.impute import IterativeImputer

try:
    import fcntl
except ImportError:  # not on Windows: cache_lock then locks nothing
    fcntl = None


# ---- the scripts' edges: bad input stops with one `error:` line, and no file is half-written ----------------

class UserError(ValueError):
    """Bad input or a bad request from the user; one line naming the file, row, column or option."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill), raised where the process is, like Ctrl-C, so the same clean-up follows."""


def raise_terminated(signum, frame):
    raise Terminated()


def run_cli(main, argv=None, resume_option=None):
    """Run `main(argv)`: a UserError / OSError is one `error:` line, exit 2; Ctrl-C / SIGTERM one `interrupted`
    line with what was kept (exc.progress) and the command to run again, exit 128 + the signal."""
    installed = threading.current_thread() is threading.main_thread()     # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, raise_terminated) if installed else None
    try:
        return main(argv)
    except BrokenPipeError:   # the reader went away (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so the exit's flush finds no pipe
        sys.exit(141)                                                    # 128 + SIGPIPE, as a shell reports it
    except (UserError, OSError, MemoryError, torch.OutOfMemoryError) as exc:   # MemoryError: e.g. an option asking
        msg = f"{exc.filename}: {exc.strerror or exc}" if isinstance(exc, OSError) and exc.filename else str(exc)
        msg += "; a smaller --batch-size needs less" * isinstance(exc, torch.OutOfMemoryError)   # for 32 GiB; torch's:
        print("error: " + " ".join(msg.split()), file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, RuntimeError) as exc:
        torchrun, lost = int(os.environ.get("WORLD_SIZE", "1")) > 1, isinstance(exc, RuntimeError)
        if lost and not (torchrun and ("gloo" in str(exc) or isinstance(exc, torch.distributed.DistError))):
            raise                                      # lost: a collective failed, another process having stopped
        args = list(sys.argv[1:] if argv is None else argv)
        if resume_option and resume_option not in args:
            args.append(resume_option)
        progress, term = getattr(exc, "progress", None), isinstance(exc, Terminated)
        command = shlex.join([sys.executable, sys.argv[0], *args])
        if torchrun:                                   # one of torchrun's processes
            command = "torchrun <its options> " + shlex.join([sys.argv[0], *args])
        print(("error: another of torchrun's processes stopped (torchrun names it); this one stopped" if lost else
               f"interrupted ({'SIGTERM' if term else 'Ctrl-C'})") + (f" {' '.join(progress.split())}" if progress
              else "") + f"; {'resume' if resume_option else 'run again'} with: {command}", file=sys.stderr, flush=True)
        sys.exit(2 if lost else 128 + (signal.SIGTERM if term else signal.SIGINT))
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# errors of a write that are the folder's, not the program's: the disk or quota is full, or it cannot be written
DISK_FULL = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT}


def size_text(n):
    """'41472 bytes', with MiB / GiB beside it when large."""
    unit, scale = next(((u, s) for u, s in (("GiB", 2 ** 30), ("MiB", 2 ** 20)) if n >= s), (None, 1))
    return f"{n} bytes" + (f" ({n / scale:.1f} {unit})" if unit else "")


@contextlib.contextmanager
def atomic_path(path, nbytes=None):
    """A temporary path beside `path`, renamed onto it when the block ends well, else removed: no reader sees a
    partial file. A full disk or an unwritable folder is a UserError naming the folder and the bytes needed."""
    d, base = os.path.split(os.path.abspath(os.fspath(path)))
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):   # /dev/null, a pipe: kept
        raise UserError(f"{path}: not a regular file (a device or a pipe?); give a file to write")
    tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex[:12]}-{base}")   # ends as `path`: writers read the extension
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL | UNWRITABLE:
            need = size_text(nbytes) if nbytes else f"more than {size_text(written)}" if written else "some space"
            free, why = "", exc.strerror or exc
            with contextlib.suppress(OSError, AttributeError):
                free = f", {size_text(os.statvfs(d).f_bavail * os.statvfs(d).f_frsize)} free there"
            raise UserError(f"{d}: no space left to write {base} ({why}): it needs {need}{free}; free some space or "
                            f"choose another folder" if exc.errno in DISK_FULL else f"{d}: cannot write {base} there "
                            f"({why}); it needs {need}; choose a folder you can write to") from None
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a UserError: one `error:` line under run_cli, not usage + error."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def check_number(option, value, least=None, above=None, most=None):
    """A numeric option (or each of a list) finite and >= least, > above, <= most, else a UserError naming it."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    want = " and ".join(w for b, w in ((least, f"at least {least}"), (above, f"above {above}"),
                                       (most, f"at most {most}")) if b is not None)
    for v in (v for v in values if v is not None):
        if not math.isfinite(v) or least is not None and v < least or above is not None and v <= above \
                or most is not None and v > most:
            raise UserError(f"{option} {' '.join(map(str, values))}: " + ("must be a finite number" if not
                            math.isfinite(v) else ("each " if len(values) > 1 else "") + f"must be {want}"))


def same_file(a, b):
    """Whether writing `a` would replace `b`: the same path or another spelling of it (a symlinked folder, `..`, a
    case-insensitive file system, a hard link). A symlink `a` does not count: an atomic write replaces the link."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    with contextlib.suppress(OSError):
        return not os.path.islink(a) and os.path.samefile(a, b)
    return False


def check_output(option, path, inputs=()):
    """An output file named by `option`: refused when it is a folder (or named as one: `out/`) or would replace one
    of `inputs`."""
    folder = os.path.isdir(path) or os.fspath(path).endswith(("/", os.sep))
    if folder or os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{option} {path}: is a folder; give the file to write" if folder else
                        f"{option} {path}: not a regular file (a device or a pipe?); give the file to write")
    for p in inputs:
        if p and same_file(path, p):
            raise UserError(f"{option} {path}: would overwrite {p}, an input of this command; choose another file")


def check_folder(option, path, what):
    """An output folder named by `option`, before any work: refused when it is a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path}: a file, not a folder; give the folder for {what}")


def file_sha256(path):
    """sha256 of a file's bytes: a table's identity (stored in checkpoints), an image's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


table_sha256 = file_sha256


def warn(message):
    """A legitimate but odd input: one `warning: ...` line on stderr, and the run goes on."""
    print("warning: " + " ".join(str(message).split()), file=sys.stderr, flush=True)


def json_safe(obj):
    """obj as strict JSON holds it: NaN / inf as null, numpy values as numbers and lists, dict keys as strings."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if hasattr(obj, "tolist") or isinstance(obj, (list, tuple)):
        return json_safe(obj.tolist()) if hasattr(obj, "tolist") else [json_safe(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):
        return int(obj) if isinstance(obj, numbers.Integral) else float(obj) if math.isfinite(obj) else None
    return obj


def write_json(obj, path):
    write_bytes(json.dumps(json_safe(obj), indent=2, allow_nan=False).encode(), path)


def spreadsheet_safe(cell):
    """A text cell a spreadsheet would run as a formula (= + - @ tab CR ') with a ' in front, so it shows as text
    (OWASP on CSV injection); numbers are kept. Removing one leading ' gives back what was escaped."""
    if isinstance(cell, str) and cell.startswith(("=", "+", "-", "@", "\t", "\r", "'")) \
            and not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", cell):
        return "'" + cell
    return cell


def write_csv(rows, columns, path, for_people=False):
    """rows: dicts or lists in column order; for_people (never read back): every cell through spreadsheet_safe."""
    columns, cell, buf = list(columns), (spreadsheet_safe if for_people else (lambda v: v)), io.StringIO(newline="")
    rows = [[r.get(c, "") for c in columns] if isinstance(r, dict) else r for r in rows]
    csv.writer(buf).writerows([cell(v) for v in r] for r in [columns, *rows])
    write_text(buf.getvalue(), path)


def write_text(text, path):
    write_bytes(text.encode("utf-8"), path)


def write_bytes(blob, path):
    with atomic_path(path, memoryview(blob).nbytes) as tmp, open(tmp, "wb") as f:
        f.write(blob)


def duration_text(seconds):
    """'0.4 s', '45 s', '3 min 10 s', '2 h 5 min': the one format of every progress line."""
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
    """Progress lines on stdout (none when quiet), at most every `every` s and `step` of the work; item_done(): a line
    per finished item (a run), the time left from their mean, `parallel` at a time."""

    def __init__(self, what, total, unit="items", quiet=False, every=5.0, step=0.05, clock=time.monotonic,
                 parallel=1):
        self.what, self.total, self.unit, self.quiet, self.every, self.step = what, total, unit, quiet, every, step
        self.clock, self.parallel, self.seconds, self.printed = clock, parallel, 0.0, False
        self.done = self.base_done = self.last_done = 0
        self.t0 = self.last = self.base_t = clock()

    def say(self, line):
        if not self.quiet:
            print(line, flush=True)
            self.printed = True

    def hushed(self):
        return contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext()

    def rebase(self):   # the time left from the pace after this point (past a start-up)
        self.base_t, self.base_done = self.clock(), self.done

    def elapsed(self):
        return self.clock() - self.t0

    def left(self, spent=0.0):
        """Seconds still to go at the pace so far (None before the first item), less `spent` by items running."""
        n = self.done - self.base_done
        if n <= 0:
            return None
        if self.seconds:
            return max(0.0, self.seconds / n * (self.total - self.done) - spent) / self.parallel
        return (self.clock() - self.base_t) / n * (self.total - self.done)

    def pace(self, done, seconds):
        r = done / max(seconds, 1e-9)
        return (f"{r:.0f}" if r >= 10 else f"{r:.1f}" if r >= 1 else f"{r:.2g}") + f" {self.unit}/s"

    def advance(self, n=1):
        self.done += n
        now = self.clock()
        if (now - self.last >= self.every and self.done - self.last_done >= self.step * self.total
                and self.done < self.total and self.left() is not None):
            self.say(f"{self.what}: {self.done} of {self.total} {self.unit} ({100 * self.done // self.total}%), "
                     f"{self.pace(self.done - self.base_done, now - self.base_t)}, about "
                     f"{duration_text(self.left())} left")
            self.last, self.last_done = now, self.done

    def finish(self, always=False):
        if self.printed or always or self.elapsed() >= self.every:
            self.say(f"{self.what}: {self.done} {self.unit} in {duration_text(self.elapsed())}"
                     + (f" ({self.pace(self.done, self.elapsed())})" if self.done else ""))

    def item_done(self, seconds, label, result="", spent=0.0):
        """`run 7 of 40 done (<label>, 3 min 10 s)<result>; about 2 h 5 min left for the 33 still to train`, the
        last `...; all 40 in 2 h 5 min`. spent: seconds the items still running have run."""
        self.seconds, self.done = self.seconds + seconds, self.done + 1
        head = f"{self.unit.rstrip('s')} {self.done} of {self.total} done ({label}, {duration_text(seconds)}){result}"
        left = f"about {duration_text(self.left(spent))} left for the {self.total - self.done} still to {self.what}"
        self.say(f"{head}; {left if self.done < self.total else f'all {self.done} in {duration_text(self.elapsed())}'}")


# ---- the AD tabular record (Sec. 3.3, 4.3.3) ------------------------------------------------------------------

AD_ATTRIBUTES = ("AGE", "PTGENDER", "PTEDUCAT", "APOE4", "ABETA", "PTAU", "TAU", "FDG", "AV45")
AD_CONTINUOUS = tuple(a for a in AD_ATTRIBUTES if a != "PTGENDER")  # 8 attributes, z-scored
SEX_CODES = {"male": 0, "m": 0, "female": 1, "f": 1}  # 0 = male, 1 = female everywhere
# What an attribute can hold: (lowest, highest, whether it counts: APOE4 is copies of the e4 allele). The
# biomarkers (CSF pg/mL, PET SUVR) cannot be negative; beyond 1e6 is a unit or export error.
ATTRIBUTE_RANGES = {"AGE": (0, 120, False), "PTEDUCAT": (0, 40, False), "APOE4": (0, 2, True), "Age": (0, 120, False),
                    **{a: (0, 1e6, False) for a in ("ABETA", "PTAU", "TAU", "FDG", "AV45")}}
MISSING_CODES = (-4.0, -1.0)   # ADNI: -4 "not applicable / not collected", -1 "missing"
CENSORED = ("ABETA", "PTAU", "TAU")   # beyond the assay's range ADNIMERGE writes `>1700`, `<8`
EMPTY_CELLS = ("", "NA", "NAN", "N/A", "NULL")   # R, pandas, spreadsheets and databases write an empty cell so


def parse_value(text):
    """A cell -> float: empty or NA is NaN (missing); ADNIMERGE's censored `>1700` is 1700.0, `<8` is 8.0."""
    s = "" if text is None else str(text).strip()
    if s.upper() in EMPTY_CELLS:
        return math.nan
    v = float(s[1:].strip() if s[0] in "<>" else s)
    if not math.isfinite(v):
        raise ValueError(s)
    return v


def parse_attribute(col, text, checked=True):
    """An AD attribute cell (or brain age's Age) -> float: PTGENDER 0 male / 1 female, ADNI's -4 / -1 NaN (missing);
    if `checked`, within what `col` can hold (ATTRIBUTE_RANGES), else a ValueError (callers add the row and column)."""
    s = "" if text is None else str(text).strip()
    with contextlib.suppress(ValueError):
        if col in AD_ATTRIBUTES and float(s) in MISSING_CODES:
            return math.nan
    if col == "PTGENDER":
        if s.upper() not in EMPTY_CELLS and s.lower() not in SEX_CODES:     # R's NA empty as in every column
            raise ValueError(f"expected Male or Female, got {s!r}")
        return math.nan if s.upper() in EMPTY_CELLS else float(SEX_CODES[s.lower()])
    if s[:1] in ("<", ">") and col not in CENSORED:
        raise ValueError(f"censored value {s!r}: only the CSF assays ({', '.join(CENSORED)}) are censored")
    try:
        v = parse_value(s)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    lo, hi, count = ATTRIBUTE_RANGES[col]
    if checked and not math.isnan(v) and (v < lo or v > hi or (count and v != int(v))):
        what = f"one of {', '.join(str(k) for k in range(int(lo), int(hi) + 1))}" if count else f"{lo:g} to {hi:g}"
        raise ValueError(f"{'negative' if v < 0 else 'impossible'} value {s!r} (expected {what})")
    return v


class TabularPreprocessor:
    """AD attributes -> float32 features fitted on training rows (Sec. 3.3): sex one-hot, 8 z-scores, missing
    indicators; IterativeImputer's steps kept as numbers, replayed in numpy (no pickled sklearn in a checkpoint)."""

    def __init__(self, state=None):
        self.state = None
        if state is not None:
            self.load_state_dict(state)

    @staticmethod
    def parse(raw_rows):
        """raw rows (dicts of cell text) -> sex (N,) with NaN where missing, X (N, 8) float64 with NaN."""
        X = np.full((len(raw_rows), len(AD_ATTRIBUTES)), np.nan)
        for i, row in enumerate(raw_rows):
            for j, col in enumerate(AD_ATTRIBUTES):
                try:
                    X[i, j] = parse_attribute(col, row.get(col), checked=False)
                except ValueError as exc:
                    raise UserError(f"tabular row {i + 1}: column {col}: {exc}") from None
        return X[:, 1], np.delete(X, 1, 1)                              # PTGENDER is AD_ATTRIBUTES[1]

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
        steps, init = [], Z.mean(0)     # no empty cell in training: an empty one is the mean (sex: the share of women)
        if missing.any():
            imp = IterativeImputer(max_iter=10, random_state=0, keep_empty_features=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning when max_iter rounds are reached
                imp.fit(Z)
            init = imp.initial_imputer_.statistics_
            steps = [{"feat": int(t.feat_idx), "neighbors": t.neighbor_feat_idx.tolist(),
                      "coef": t.estimator.coef_.tolist(), "intercept": float(t.estimator.intercept_)}
                     for t in imp.imputation_sequence_]
        imputed = list(AD_CONTINUOUS) + ["PTGENDER"]
        self.state = {"version": 2, "attributes": list(AD_CONTINUOUS), "imputed": imputed, "mean": mean.tolist(),
                      "std": std.tolist(), "init": init.tolist(), "steps": steps,
                      "indicators": [imputed[j] for j in range(Z.shape[1]) if missing[:, j].any()],
                      "empty": [imputed[j] for j in range(Z.shape[1]) if missing[:, j].all()]}   # see unlearned
        return self

    @property
    def columns(self):
        s = self.state
        return ["PTGENDER_Male", "PTGENDER_Female"] + list(s["attributes"]) + [f"{a}_missing" for a in s["indicators"]]

    @property
    def n_features(self):
        return len(self.columns)

    def unlearned(self, raw_rows):
        """{column: (N,) bool, the rows with a value} of the columns empty in every training row: transform reads them
        as missing, as in training (the model never learned them); callers say so rather than refuse."""
        sex, X = self.parse(raw_rows)
        Z = np.concatenate([X, sex[:, None]], 1)
        return {a: ~np.isnan(Z[:, self.state["imputed"].index(a)]) for a in self.state.get("empty", [])}

    def transform(self, raw_rows):
        """raw rows -> (N, n_features) float32, no NaN; each row on its own (IterativeImputer.transform's steps)."""
        s = self.state
        sex, X = self.parse(raw_rows)
        Z = np.concatenate([(X - np.array(s["mean"])) / np.array(s["std"]), sex[:, None]], 1)   # (N, 9)
        Z[:, [s["imputed"].index(a) for a in s.get("empty", [])]] = np.nan                # see unlearned
        missing = np.isnan(Z)
        Z = np.where(missing, np.array(s["init"])[None, :], Z)                    # initial (mean) fill
        for st in s["steps"]:
            rows = missing[:, st["feat"]]
            if rows.any():
                Z[rows, st["feat"]] = Z[rows][:, st["neighbors"]] @ np.array(st["coef"]) + st["intercept"]
        female = np.clip(Z[:, -1], 0.0, 1.0)                                      # imputed sex in [0, 1]
        ind = missing[:, [s["imputed"].index(a) for a in s["indicators"]]]      # (N, indicators)
        return np.concatenate([np.stack([1.0 - female, female], 1), Z[:, :-1], ind], 1).astype(np.float32)

    def fit_transform(self, raw_rows):
        return self.fit(raw_rows).transform(raw_rows)

    def state_dict(self):
        return json.loads(json.dumps(self.state))  # a deep copy of plain numbers, lists and str

    def load_state_dict(self, state):
        if not isinstance(state, dict) or state.get("version") != 2 or "steps" not in state:
            raise UserError("tabular preprocessor state is not a version-2 TabularPreprocessor state "
                            "(written by an older version of this code?)")
        self.state = json.loads(json.dumps(state))
        return self


# ---- the splits: AD's five stratified subsets and their folds (Sec. 4.3.4, App. C.1), brain age's 80/10/10 -----
# Both deal a shuffled cohort into parts within groups of (sex, diagnosis, age bin), so every part keeps the joint
# distribution; the same seed gives the same split on every machine.

def _stratified_order(keys, age, n_bins, seed):
    """Shuffled with the seed, then grouped by the keys and equal-width age bins (random order within a group).
    An unknown age (NaN) is a bin of its own, so the split never depends on imputation."""
    age = np.asarray(age, np.float64)
    known = np.isfinite(age)
    bins = np.full(len(age), -1)
    if known.any():
        edges = np.linspace(age[known].min(), age[known].max(), n_bins + 1)[1:-1]
        bins = np.where(known, np.digitize(np.where(known, age, 0.0), edges), -1)
    perm = np.random.default_rng(seed).permutation(len(age))
    return perm[np.lexsort(tuple(np.asarray(k)[perm] for k in reversed([*keys, bins])))]   # stable: perm in groups


def ad_split(sex, labels, age, seed, n_subsets=5, n_age_bins=20):
    """-> (N,) int64 subset 0..n_subsets-1 per subject (Sec. 4.3.4): dealt round-robin within each (sex,
    diagnosis, age bin) group, the position carried over between groups, so the subsets differ by at most one."""
    n = len(labels)
    if n < n_subsets:
        raise UserError(f"{n} subjects cannot be split into {n_subsets} subsets")
    subsets = np.empty(n, np.int64)
    subsets[_stratified_order([sex, labels], age, n_age_bins, seed)] = np.arange(n) % n_subsets
    return subsets


def ad_fold(subsets, fold, test_subset=4):
    """-> (train_idx, val_idx, test_idx): test = subset 4, validation = subset `fold` (0..3), train = the rest."""
    subsets = np.asarray(subsets)
    n_sub = int(subsets.max()) + 1
    if not (0 <= fold < n_sub) or fold == test_subset:
        raise UserError(f"fold must be in 0..{n_sub - 2} (subset {test_subset} is the test set), got {fold}")
    idx = np.arange(len(subsets))
    return idx[(subsets != fold) & (subsets != test_subset)], idx[subsets == fold], idx[subsets == test_subset]


BRAIN_AGE_FRACTIONS = (0.8, 0.1, 0.1)  # Sec. 4.2.3


def brain_age_split(age, sex, seed, fractions=None, n_age_bins=20):
    """-> (train_idx, val_idx, test_idx), 80/10/10 (or `fractions`) within every (sex, age bin) group (Sec. 4.2.3):
    the next subject goes to the part furthest below its share so far."""
    fractions = BRAIN_AGE_FRACTIONS if fractions is None else fractions
    fr = np.asarray(fractions, np.float64)
    if len(age) < len(fr) or np.any(fr < 0) or abs(fr.sum() - 1) > 1e-6:
        raise UserError(f"cannot split {len(age)} subjects into fractions {tuple(fractions)}")
    counts, part = np.zeros(len(fr)), np.empty(len(age), np.int64)
    for k, i in enumerate(_stratified_order([sex], age, n_age_bins, seed)):
        part[i] = j = int(np.argmax(fr * (k + 1) - counts))
        counts[j] += 1
    return tuple(np.flatnonzero(part == j) for j in range(len(fr)))


# ---- the tables: read and validated, a bad cell named with its file, line and column --------------------------

CLASS_NAMES = ("CN", "MCI", "AD")
GROUP_ALIASES = {"CN": "CN", "MCI": "MCI", "EMCI": "MCI", "LMCI": "MCI", "AD": "AD", "DEMENTIA": "AD"}
IMAGE_SUFFIXES = (".nii.gz", ".nii")


def read_csv_rows(csv_path, required, optional=()):
    """-> ([(line number, row dict)], fieldnames), the delimiter, columns, quotes, field counts and encoding checked."""
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: " + ("a folder, not a table (a CSV file)" if os.path.isdir(csv_path) else
                                           "table not found"))
    rows = []
    with open(csv_path, "rb") as f:
        blob = f.read().removeprefix(b"\xef\xbb\xbf")   # decoded whole: a bad byte's position is the file's
    try:
        text = blob.decode()
    except UnicodeDecodeError as exc:
        raise UserError(f"{csv_path} line {len((blob[:exc.start] + b'.').splitlines())}: byte "
                        f"{blob[exc.start]:#04x} is not UTF-8: save the table as CSV UTF-8") from None
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{csv_path}: empty file, no header line")
            fields = [c.strip() for c in header]   # a column read in any case (ptgender, AGE for Age) takes its name
            fields = [next((k for k in (*required, *optional) if k.lower() == c.lower() and k not in fields), c)
                      for c in fields]
            counts = {d: ",".join(fields).count(d) for d in ",;\t"}
            other = max((";", "\t"), key=counts.get)
            if counts[other] > counts[","]:
                name = "semicolon" if other == ";" else "tab"
                raise UserError(f"{csv_path}: the delimiter looks like a {name} ({counts[other]} {name}s, "
                                f"{counts[',']} commas in the header line): save the table comma-separated")
            for k, c in enumerate(fields):
                if c and c in fields[:k]:
                    raise UserError(f"{csv_path}: column {c} appears twice in the header (columns "
                                    f"{fields.index(c) + 1} and {k + 1}): rename or remove one")
            missing = [c for c in required if c not in fields]
            if missing:
                raise UserError(f"{csv_path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            start = reader.line_num + 1
            for cells in reader:
                multi = next((j for j, v in enumerate(cells) if "\n" in v or "\r" in v), None)
                if multi is not None:
                    col = fields[multi] if multi < len(fields) else "(beyond the header)"
                    raise UserError(f"{csv_path} line {start}: a quote opened in column {col} is not closed "
                                    f"before line {reader.line_num} (cells cannot span lines)")
                if any(v.strip() for v in cells):                      # blank lines and rows of empty cells skipped
                    if len(cells) != len(fields):                      # a cell left out shifts the others along
                        raise UserError(f"{csv_path} line {start}: {len(cells)} fields, the header has {len(fields)}")
                    rows.append((start, {k: v.strip() for k, v in zip(fields, cells)}))
                start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{csv_path}: not a readable UTF-8 CSV table ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise UserError(f"{csv_path}: no data rows")
    return rows, fields


def plain_file_name(name):
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def output_names(ids):
    """A file name per id, inside its folder and distinct but for case: the id if plain, else made so (+ its sha1)."""
    names, used = [], set()
    for s in ids:
        name = s if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", s) else None
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", s)[:64].lstrip(".-") or "subject"
        tag, k = hashlib.sha1(s.encode()).hexdigest()[:8], 0
        while name is None or name.lower() in used:
            name, k = f"{stem}-{tag}" + (f"-{k}" if k else ""), k + 1
        used.add(name.lower())
        names.append(name)
    return names


def check_subjects(csv_path, rows, as_file_names=False):
    """-> the Subject of every row: filled, unique and, as_file_names, a plain file name unique but for case."""
    seen, folded = {}, {}
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
        seen[s], folded[s.casefold()] = line, (line, s)
    return list(seen)


def find_image(folder, subject):
    return next((p for p in (os.path.join(folder, subject + x) for x in IMAGE_SUFFIXES) if os.path.isfile(p)), None)


def _image_paths(csv_path, rows, subjects, image_dir):
    """Image path per subject: the `image` column (relative to the CSV), else <image_dir>/<Subject>.nii[.gz]; one
    scan under two subjects (a symlink, a hard link) is refused: it could sit in training and test at once, and so
    are two scans for one subject, one in the column and one in the --image-dir given."""
    base, given = os.path.dirname(os.path.abspath(csv_path)), image_dir
    if image_dir is not None and not os.path.isdir(image_dir):
        raise UserError(f"--image-dir {image_dir}: folder not found")
    image_dir = image_dir if image_dir is not None else os.path.join(base, "images")
    paths, seen = [], {}
    for (line, row), subj in zip(rows, subjects):
        if row.get("image"):
            p = want = os.path.join(base, row["image"])
            other = given and plain_file_name(subj) and find_image(image_dir, subj)
            if other and os.path.isfile(p) and not os.path.samefile(other, p):
                raise UserError(f"{csv_path} line {line}: subject {subj}: column image names {p}, --image-dir another "
                                f"file, {other}: give the images one way (drop the column or --image-dir)")
        elif not plain_file_name(subj):
            raise UserError(f"{csv_path} line {line}: Subject {subj!r} is not a plain file name, so it cannot "
                            f"name an image in {image_dir} (give the path in an `image` column)")
        else:
            p, want = find_image(image_dir, subj), f"{os.path.join(image_dir, subj)}.nii.gz (or .nii)"
        if p is None or not os.path.isfile(p):
            raise UserError(f"{csv_path} line {line}: subject {subj}: image file not found: {want}")
        st = os.stat(p)
        other = seen.setdefault((st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(p), (subj, line))
        if other != (subj, line):
            raise UserError(f"{csv_path} line {line}: subject {subj}: image {p} is also subject {other[0]}'s "
                            f"(line {other[1]})")
        paths.append(p)
    return paths


def read_cell(csv_path, line, row, col, parse=parse_attribute):
    """parse(col, the cell) -> float, its ValueError a UserError naming the file, line, subject and column."""
    try:
        return parse(col, row.get(col, ""))
    except ValueError as exc:
        raise UserError(f"{csv_path} line {line}: subject {row.get('Subject')}: column {col}: {exc}") from None


@dataclass
class Table:
    """A cohort as read from its CSV (AD: Sec. 4.3.1, 4.3.3; brain age: Sec. 4.2.1)."""
    subjects: list
    labels: np.ndarray      # AD: (N,) int64 index into class_names, -1 = no diagnosis (prediction tables only)
    raw: list               # AD: (N,) dicts attribute -> cell text, for TabularPreprocessor
    sex: np.ndarray         # (N,) int64, 0 = male, 1 = female, -1 = unknown (an empty AD cell)
    age: np.ndarray         # (N,) float32 years, NaN = unknown
    image_paths: list       # (N,) str, or None when need_images=False
    csv_path: str
    class_names: tuple = CLASS_NAMES
    skipped: dict = None    # AD: {Group value: rows skipped}, "" for an empty Group


def parse_group_map(pairs):
    """--group-map SMC=CN X=AD -> {"SMC": "CN", "X": "AD"} (keys upper-case; targets must be diagnoses)."""
    out = {}
    for p in pairs or ():
        key, sep, value = p.partition("=")
        target = GROUP_ALIASES.get(value.strip().upper())
        if not sep or not key.strip() or target is None:
            raise UserError(f"--group-map {p}: expected VALUE=DIAGNOSIS with DIAGNOSIS one of CN, MCI, AD")
        if out.setdefault(key.strip().upper(), target) != target:
            raise UserError(f"--group-map {' '.join(pairs)}: {key.strip()} is mapped to two diagnoses; give it one")
    return out


def diagnosis(group, group_map=None):
    """A Group cell -> "CN", "MCI", "AD" or None (unknown or empty): --group-map first, then the aliases."""
    g = group.strip().upper()
    return (group_map or {}).get(g) or GROUP_ALIASES.get(g)


def read_ad_table(csv_path, image_dir=None, need_images=True, classes=3, group_map=None, for_prediction=False):
    """An ADNIMERGE-like AD table, validated (Sec. 4.3.1, 4.3.3); any attribute may be empty (Sec. 3.3). Rows whose
    Group is not a diagnosis are skipped and counted; for_prediction: Group and attribute columns optional (absent:
    empty), no row left out (label -1)."""
    if classes not in (2, 3):
        raise UserError(f"classes must be 2 (CN vs AD) or 3, got {classes}")
    names = CLASS_NAMES if classes == 3 else ("CN", "AD")
    rows, fields = read_csv_rows(csv_path, ("Subject",) + (() if for_prediction else ("Group",) + AD_ATTRIBUTES),
                                 ("Group", "image") + AD_ATTRIBUTES)
    absent = [c for c in AD_ATTRIBUTES if c not in fields]                   # for_prediction: a patient's unknowns
    if absent:
        warn(f"{csv_path}: no column {', '.join(absent)}: read as empty for every subject (Sec. 3.3)")
    keep, labels, sexes, ages, skipped, codes = [], [], [], [], collections.Counter(), collections.Counter()
    for line, row in rows:
        g = diagnosis(row.get("Group", ""), group_map)
        if g is None and not for_prediction:
            skipped[row["Group"]] += 1
            continue
        v = {col: read_cell(csv_path, line, row, col) for col in AD_ATTRIBUTES}   # the cells parsed again later
        codes.update(c for c in AD_ATTRIBUTES if math.isnan(v[c]) and row.get(c, "").upper() not in EMPTY_CELLS)
        if classes == 2 and g == "MCI" and not for_prediction:
            continue
        keep.append((line, row))
        labels.append(names.index(g) if g in names else -1)
        sexes.append(-1 if math.isnan(v["PTGENDER"]) else int(v["PTGENDER"]))
        ages.append(v["AGE"])
    if not keep:
        seen = ", ".join(f"{k or '(empty)'} {n}" for k, n in skipped.items())
        raise UserError(f"{csv_path}: no {' or '.join(names)} subjects" + (f" (Group values: {seen}; "
                        f"map them with --group-map VALUE=CN|MCI|AD)" if seen else ""))
    for col in sorted(codes, key=AD_ATTRIBUTES.index):
        warn(f"{csv_path}: column {col}: {codes[col]} cell{'s hold' if codes[col] > 1 else ' holds'} ADNI's "
             f"missing-value code -4 or -1, read as missing")
    subjects = check_subjects(csv_path, keep)
    paths = _image_paths(csv_path, keep, subjects, image_dir) if need_images else None
    raw = [{a: row.get(a, "") for a in AD_ATTRIBUTES} for _, row in keep]
    return Table(subjects, np.array(labels, np.int64), raw, np.array(sexes, np.int64), np.array(ages, np.float32),
                 paths, os.fspath(csv_path), names, skipped)


def skipped_summary(table):
    """'' or the line saying which Group values were skipped, for the scripts to print."""
    if not table.skipped:
        return ""
    n = sum(table.skipped.values())
    return (f"{table.csv_path}: skipped {n} row{'s' * (n > 1)} whose Group is not CN, MCI or AD: "
            + ", ".join(f"{k or '(empty)'} {v}" for k, v in sorted(table.skipped.items()))
            + " (map them with --group-map VALUE=CN|MCI|AD)")


def read_brain_age_table(csv_path, image_dir=None, need_images=True, for_prediction=False):
    """Subject, Age, Sex (M/F) [, image] (Sec. 4.2.1); rows with an empty Age skipped and counted (no target), but
    for_prediction: Age may be empty (NaN), never Sex."""
    rows, _ = read_csv_rows(csv_path, ("Subject", "Sex") if for_prediction else ("Subject", "Age", "Sex"),
                            ("Age", "image"))
    ages, sexes, keep, no_age = [], [], [], []
    for line, row in rows:
        age = read_cell(csv_path, line, row, "Age")
        if math.isnan(age) and not for_prediction:
            no_age.append(row["Subject"])
            continue
        ages.append(age)
        sexes.append(SEX_CODES.get(row["Sex"].lower()))
        if sexes[-1] is None:
            raise UserError(f"{csv_path} line {line}: subject {row['Subject']}: column Sex: "
                            f"expected M or F, got {row['Sex']!r}")
        keep.append((line, row))
    if no_age and not keep:
        raise UserError(f"{csv_path}: column Age is empty for every subject: no age to train or test on")
    if no_age:
        warn(f"{csv_path}: skipped {len(no_age)} of {len(rows)} subjects whose Age is empty (the first: {no_age[0]}): "
             f"no age to train or test on")
    subjects = check_subjects(csv_path, keep)
    paths = _image_paths(csv_path, keep, subjects, image_dir) if need_images else None
    return Table(subjects, None, None, np.array(sexes, np.int64), np.array(ages, np.float32), paths,
                 os.fspath(csv_path))


# ---- the images: NIfTI read and validated, their content hashes, the hippocampus crops -------------------------

ABSURD = 1e15   # |voxel|: no scanner's scale reaches it (a wrong header scale); below it float32 z-scores stay finite


def _where(path, subject=None):
    return f"{path} (subject {subject})" if subject is not None else f"{path}"


def _open_nifti(path, where, axis_aligned=True):
    """One NIfTI's header, nothing decoded -> (nibabel image, its 3D shape with trailing 1s squeezed). axis_aligned:
    a rotated affine refused (as_closest_canonical only permutes and flips axes: it would be read as unrotated)."""
    if not os.path.isfile(path):
        raise UserError(f"{where}: image file not found")
    try:
        img = nib.load(path)
    except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
        raise UserError(f"{where}: unreadable NIfTI header ({type(exc).__name__}: {exc})") from None
    shape = tuple(img.shape[:3]) + tuple(n for n in img.shape[3:] if n != 1)     # one volume in 4D is 3D
    if len(shape) != 3:
        raise UserError(f"{where}: expected a 3D image, got shape {tuple(img.shape)}")
    if not np.isfinite(img.affine).all() or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise UserError(f"{where}: the header's voxel-to-world affine is degenerate (a zero voxel size?): "
                        f"{img.affine[:3, :3].round(4).tolist()}")
    cosines = np.abs(img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0))    # 0 or 1 unless rotated
    if axis_aligned and np.abs(cosines - cosines.round()).max() > 1e-3:
        raise UserError(f"{where}: the header's affine is rotated off the voxel axes ({cosines.round(3).tolist()}), "
                        f"which would be read as unrotated; resample it to the training orientation (preprocess.py)")
    return img, shape


def load_nifti(path, subject=None, canonical=True):
    """One NIfTI -> a nibabel image of float32 3D data (RAS if canonical), refused if truncated or NaN / inf."""
    where = _where(path, subject)
    img, shape = _open_nifti(path, where, canonical)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # short gzip stream, bad CRC, short file
        raise UserError(f"{where}: truncated or corrupt NIfTI ({type(exc).__name__}: {exc})") from None
    step = getattr(img.dataobj, "slope", 0) if np.issubdtype(img.get_data_dtype(), np.integer) else 0
    if step:     # integers scaled by the header: their zero (the background) decodes up to half a step off zero
        data = np.where(np.abs(data) < abs(step) / 2, np.float32(0), data)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise UserError(f"{where}: {bad} NaN/inf voxels")
    out = nib.Nifti1Image(data, img.affine)
    return nib.as_closest_canonical(out) if canonical else out


def load_volume(path, subject=None, expected_shape=None):
    """A validated float32 (X, Y, Z) RAS array: no absurd value and not one constant."""
    where = _where(path, subject)
    volume = np.asarray(load_nifti(path, subject).dataobj, dtype=np.float32)
    if expected_shape is not None and tuple(volume.shape) != tuple(expected_shape):
        raise UserError(f"{where}: image shape {tuple(volume.shape)}, expected {tuple(expected_shape)}")
    lo, hi = float(volume.min()), float(volume.max())
    if max(-lo, hi) > ABSURD:
        n = int(np.count_nonzero(np.abs(volume) > ABSURD))
        raise UserError(f"{where}: {n} voxels beyond +-{ABSURD:g} (the largest {max(-lo, hi):.3g}): a wrong scale in "
                        f"the header or a broken export? Rescale or z-score the image (preprocess.py)")
    if lo == hi:
        raise UserError(f"{where}: no signal: every voxel is {lo:g} (a failed registration or an empty export?)")
    return volume


def check_image_geometry(paths, subjects):
    """-> (shape, voxel size in mm) in RAS, from the headers alone: one of each for the whole cohort, else refused."""
    first = None
    for p, s in zip(paths, subjects):
        img, raw_shape = _open_nifti(p, _where(p, s))
        zooms = nib.affines.voxel_sizes(img.affine)[:3]
        ornt = nib.orientations.io_orientation(img.affine)
        axes = ornt[:, 0].astype(int) if np.isfinite(ornt).all() else np.arange(3)  # input axis i -> RAS axes[i]
        shape = tuple(int(raw_shape[i]) for i in np.argsort(axes))
        voxel = tuple(round(float(zooms[i]), 4) for i in np.argsort(axes))
        if first is None:
            first = (shape, voxel, _where(p, s))
        elif shape != first[0]:
            raise UserError(f"{_where(p, s)}: image shape {shape} differs from {first[0]} of {first[2]}; every "
                            f"image of a cohort must have one shape (resample them, e.g. with preprocess.py)")
        elif not np.allclose(voxel, first[1], rtol=1e-3, atol=1e-4):
            raise UserError(f"{_where(p, s)}: voxel size {voxel} mm differs from {first[1]} mm of {first[2]}; every "
                            f"image of a cohort must have one voxel size (resample them, e.g. with preprocess.py)")
    return (first[0], first[1]) if first else (None, None)


def save_nifti(volume, spacing, path):
    """A float32 volume with a RAS affine of isotropic `spacing` mm, centred on the origin, written atomically."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(volume.shape[:3]) - 1) / 2
    img = nib.Nifti1Image(volume.astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def zscore(volume, inside):
    """float32 `volume` z-scored over the voxels `inside` (a boolean mask), 0 elsewhere (and everywhere if none)."""
    values = volume[inside]
    if not values.size:
        return np.zeros(volume.shape, np.float32)
    return np.where(inside, (volume - values.mean()) / max(float(values.std()), 1e-8), 0).astype(np.float32)


class NonZeroZscore:
    """Sec. 4.2.1: each brain-age image z-scored over its non-zero voxels before the model reads it, so a scanner's
    intensity scale is no feature (as for the AD crops); an ImageCache transform: done once per image."""

    def __call__(self, volume, where="volume"):
        return zscore(volume, volume != 0)

    def cache_key(self):
        return "zscored-non-zero"


BRAIN_ZSCORE = NonZeroZscore()


@dataclass
class HippocampusCrops:
    """Two boxes around the hippocampi of a RAS volume (Sec. 3.5.2); starts are voxel corners, size (D, H, W).
    __call__(volume (X, Y, Z)) -> (2, D, H, W): [left box, right box flipped along x], both like a left one, each
    z-scored over its non-zero voxels (as the authors' code: a scanner's intensity scale is no feature)."""
    left_start: tuple
    right_start: tuple
    size: tuple

    def __post_init__(self):
        self.left_start, self.right_start, self.size = (tuple(int(v) for v in t)
                                                        for t in (self.left_start, self.right_start, self.size))

    @classmethod
    def mni152_1mm(cls):
        """The paper's 64x96x64 boxes on a 1 mm MNI152 182x218x182 volume, centred at about MNI (-/+26, -22, -14)
        mm; check them on your own registration (check-ad --preview)."""
        return cls((32, 56, 26), (84, 56, 26), (64, 96, 64))

    def check(self, shape, where="volume"):
        for name, st in (("left", self.left_start), ("right", self.right_start)):
            if any(s < 0 or s + d > n for s, d, n in zip(st, self.size, shape)):
                raise UserError(f"{where}: {name} hippocampus box start {st} size {self.size} "
                                f"does not fit in image shape {tuple(shape)}")

    def __call__(self, volume, where="volume"):
        self.check(volume.shape, where)
        box = lambda start: volume[tuple(slice(a, a + d) for a, d in zip(start, self.size))]
        sides = {"left": box(self.left_start), "right": box(self.right_start)[::-1]}
        empty = [name for name, side in sides.items() if not side.any()]
        if empty:
            raise UserError(f"{where}: no signal in the {' and '.join(empty)} hippocampus box{'es' * (len(empty) > 1)} "
                            f"(every voxel 0): boxes off the brain (see check-ad --preview) or a failed registration?")
        return np.stack([zscore(side, side != 0) for side in sides.values()])

    def cache_key(self):
        return f"crops-zscored{self.left_start}{self.right_start}{self.size}"

    def as_dict(self):
        """The boxes as crops.json (and checkpoints, so a run replays its crops) hold them."""
        return {"left_start": list(self.left_start), "right_start": list(self.right_start), "size": list(self.size)}

    def save(self, path):
        write_json(self.as_dict(), path)

    @classmethod
    def load(cls, path):
        """crops.json -> HippocampusCrops; each box three whole numbers, starts >= 0, sizes >= 1."""
        try:
            with open(path) as f:
                d = json.load(f)
            boxes = {k: d[k] for k in ("left_start", "right_start", "size")}
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: not a crops file ({type(exc).__name__}: {exc})") from None
        for k, v in boxes.items():
            least = int(k == "size")   # a box starts at voxel 0 or after, and is at least 1 voxel wide
            if not (isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x)
                                                                and x == int(x) >= least for x in v)):
                raise UserError(f"{path}: {k} must be three whole numbers (x, y, z voxels), each at least {least}, "
                                f"got {v!r}")
        return cls(**boxes)


def crops_path(crops_json, data_csv):
    """Where a table's boxes come from: --crops, else crops.json next to the CSV; None: the MNI152 default."""
    path = crops_json or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "crops.json")
    return path if (crops_json or os.path.isfile(path)) else None


def load_crops(crops_json, data_csv):
    path = crops_path(crops_json, data_csv)
    return HippocampusCrops.load(path) if path else HippocampusCrops.mni152_1mm()


# ---- the image cache: every image decoded once, then served memory-mapped --------------------------------------

CACHE_WAY_OUT = "--cache-dir names a cache folder you can write to"
SOURCES_INDEX = "sources.json"   # in a cache folder: the images' content hashes, by path and file identity
ENTRY_MAGIC = b"HFcache1"        # the last 8 bytes of a cache entry, after its trailer and the trailer's length


def cache_folder(cache_dir, data_csv):
    return cache_dir or os.path.join(os.path.dirname(os.path.abspath(data_csv)), "cache")


def make_cache_folder(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:   # a cohort on read-only storage, a folder of another user
        raise UserError(f"{folder}: cannot make the decoded-image cache there ({exc.strerror or exc}); "
                        f"{CACHE_WAY_OUT}") from None


@contextlib.contextmanager
def cache_lock(folder, doing="decoding or hashing these images"):
    """No other process is inside cache_lock of this folder meanwhile (flock), so jobs sharing a cache decode and
    hash once; a wait for it is said once. Without flock it locks nothing: the entries stay right (atomic writes),
    only made more than once."""
    make_cache_folder(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError, AttributeError):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for the lock on {folder}: another process holds it ({doing}); this one goes on when "
                      f"it is done", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                   # releases the lock


def source_hashes(paths, folder, subjects, progress=False, known=None, every=5.0):
    """sha256 of every file (None for a missing one), remembered in <folder>/sources.json as [size, mtime, ctime,
    inode, sha256] by absolute path, so a second call reads no image; `known`: that index ({}: read it here)."""
    known = {} if known is None else known
    if not known:                       # a damaged or absent index: what it held is hashed again
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError), \
                open(os.path.join(folder, SOURCES_INDEX)) as f:
            known.update((k, v) for k, v in json.load(f)["files"].items() if isinstance(v, list) and len(v) == 5)
    out, new = [], 0
    shown = Progress("hashing the images", len(paths), "images", quiet=not progress, every=every)
    for p, subject in zip(paths, subjects):
        ap = os.path.abspath(p)
        try:
            st = os.stat(ap)     # a file replaced by one of its size and mtime has another ctime (not settable)
        except OSError:
            out.append(None)
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if known.get(ap, [None] * 4)[:4] != key:
            try:
                known[ap], new = key + [file_sha256(ap)], new + 1
            except OSError as exc:
                raise UserError(f"{_where(p, subject)}: unreadable image ({exc.strerror or exc})") from None
        out.append(known[ap][4])
        shown.advance()
    shown.finish()
    if new:
        try:
            write_json({"files": dict(sorted(known.items()))}, os.path.join(folder, SOURCES_INDEX))
        except (UserError, OSError) as exc:   # only a saving of time is lost
            warn(f"{exc}; the images' hashes are not remembered and are computed again next time")
    return out


def image_fingerprint(paths, cache_dir, subjects, progress=False):
    """The images' part of a run's identity: sha256 over every image's file name and content hash, in table order
    (stable when the folder moves; re-exported, re-ordered or replaced images change it)."""
    h = hashlib.sha256()
    with cache_lock(cache_dir):
        hashes = source_hashes(paths, cache_dir, subjects, progress)
    for p, subject, digest in zip(paths, subjects, hashes):
        if digest is None:
            raise UserError(f"{_where(p, subject)}: image file not found")
        h.update(f"{os.path.basename(p)}\t{digest}\n".encode())
    return h.hexdigest()


class ImageCache:
    """A cohort's images, each decoded once (validated, transformed, float32) into `<subject>-<config>-<source>.npy`
    with a trailer (source, config, CRC-32), served as read-only memmaps; a stale or damaged entry is decoded again."""
    PROGRESS_EVERY = 5.0   # seconds at least between two progress lines (hashing, checking, decoding)

    def __init__(self, paths, cache_dir, transform=None, expected_shape=None, names=None):
        self.paths = [os.path.abspath(p) for p in paths]
        self.names = list(names) if names is not None else [os.path.basename(p).split(".")[0] for p in paths]
        self.cache_dir, self.transform, self.expected_shape = cache_dir, transform, expected_shape
        self.n_decoded = 0     # decodes done by this object (tests check the cache is used)
        self._index = {}       # sources.json as read (then kept up to date) by this object
        self._checked = set()  # entries this object has read whole and found sound (problem) or written (decode)
        make_cache_folder(cache_dir)

    def __len__(self):
        return len(self.paths)

    def config(self, i):   # the decoding (renamed when load_nifti changes what it returns), the transform or None
        return f"{self.paths[i]}|scaled-zero|" + ("" if self.transform is None else self.transform.cache_key())

    def _hash(self, indices, progress=False):
        return source_hashes([self.paths[i] for i in indices], self.cache_dir, [self.names[i] for i in indices],
                             progress, self._index, self.PROGRESS_EVERY)

    def source(self, i):
        """sha256 of item i's file as it is now (None when missing), hashed again when its size or times changed."""
        if not self._index:
            self._hash(range(len(self)))     # the first time, all (one index write)
        return self._hash([i])[0]

    def entry(self, i):
        conf = hashlib.sha1(self.config(i).encode()).hexdigest()[:10]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.names[i])[:64]
        return os.path.join(self.cache_dir, f"{safe}-{conf}-{(self.source(i) or '0' * 10)[:10]}.npy")

    def problem(self, i):
        """Why item i's entry is not sound (a phrase), or None; one checked (or written) by this object is."""
        out = self.entry(i)
        if out in self._checked:
            return None
        if not os.path.exists(out):
            return "missing"
        try:
            with open(out, "rb") as f:
                major = np.lib.format.read_magic(f)[0]
                shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{major}_0")(f)
                offset, nbytes = f.tell(), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                size = f.seek(0, os.SEEK_END)
                if size < offset + nbytes + 12:
                    return f"truncated ({size} bytes, at least {offset + nbytes + 12} expected)"
                f.seek(size - 12)
                n, magic = struct.unpack("<I8s", f.read(12))
                if magic != ENTRY_MAGIC or size != offset + nbytes + n + 12:
                    return "no checksum trailer (damaged, or not written by this version)"
                f.seek(offset + nbytes)
                meta = json.loads(f.read(n))
                if dtype != np.float32 or fortran or meta.get("config") != self.config(i):
                    return f"decoded for another path, dtype or crop ({meta.get('config')!r})"
                if meta.get("source_sha256") != self.source(i):
                    return "decoded from another version of the image"
                f.seek(offset)
                if zlib.crc32(f.read(nbytes)) != meta.get("data_crc32"):
                    return "its data bytes do not match their checksum (damaged)"
        except (OSError, ValueError, EOFError, struct.error, TypeError, AttributeError) as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"
        self._checked.add(out)
        return None

    def decode(self, i):
        """Decode item i into its entry now (written whole or not at all), removing those of older sources."""
        out, source = self.entry(i), self.source(i)
        vol = load_volume(self.paths[i], self.names[i], self.expected_shape)
        where = _where(self.paths[i], self.names[i])
        arr = np.ascontiguousarray(vol if self.transform is None else self.transform(vol, where), dtype=np.float32)
        name = os.path.basename(out)
        for old in os.listdir(self.cache_dir):   # same subject and config, older source (never `out`, read maybe)
            if old != name and re.fullmatch(re.escape(name[:-14]) + r"\w{10}\.npy", old):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.cache_dir, old))
        buf = io.BytesIO()
        np.lib.format.write_array(buf, arr, allow_pickle=False)
        meta = json.dumps({"source_sha256": source, "config": self.config(i), "data_crc32": zlib.crc32(arr),
                           "data_bytes": int(arr.nbytes)}, sort_keys=True).encode()
        buf.write(meta + struct.pack("<I", len(meta)) + ENTRY_MAGIC)
        try:
            write_bytes(buf.getbuffer(), out)
        except UserError as exc:                # a full or read-only cache folder: the way out
            raise UserError(f"{exc} ({CACHE_WAY_OUT})") from None
        self._checked.add(out)
        self.n_decoded += 1

    def __getitem__(self, i):
        out, problem = self.entry(i), self.problem(i)
        if problem not in (None, "missing"):
            warn(f"cache entry {out} (subject {self.names[i]}): {problem}; decoded again")
        if problem:
            self.decode(i)
        return np.load(out, mmap_mode="r")

    def prepare(self, progress=True):
        """Check every entry and decode each missing or damaged one now."""
        with cache_lock(self.cache_dir):
            self._hash(range(len(self)), progress)
            shown = Progress("checking the image cache", len(self), "entries", not progress, self.PROGRESS_EVERY)
            problems = [shown.advance() or self.problem(i) for i in range(len(self))]
            shown.finish()
            todo = [i for i, p in enumerate(problems) if p]
            damaged = [f"{self.names[i]} ({p})" for i, p in enumerate(problems) if p not in (None, "missing")]
            if damaged:
                warn(f"cache {self.cache_dir}: {len(damaged)} entr{'y' if len(damaged) == 1 else 'ies'} damaged or "
                     f"not of their image, decoded again: " + "; ".join(damaged[:5])
                     + (f"; and {len(damaged) - 5} more" if len(damaged) > 5 else ""))
            shown = Progress("decoding the image cache", len(todo), "images", not progress, self.PROGRESS_EVERY)
            try:
                for i in todo:
                    self.decode(i)
                    shown.advance()
            except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM under run_cli: atomic writes, no partial entry
                kept = sum(os.path.exists(self.entry(i)) for i in todo)
                exc.progress = (f"while decoding the image cache {self.cache_dir}: {kept} of {len(todo)} images "
                                f"decoded and kept, none half-written")   # run_cli adds the command that goes on
                raise
            shown.finish()
        return self


# ---- the Datasets ----------------------------------------------------------------------------------------------

def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    return np.eye(2, dtype=np.float32)[np.asarray(sex, np.int64)]


def image_tensor(array):
    """A float32 copy of an image (a memory-mapped cache entry) as a tensor."""
    return torch.from_numpy(np.array(array, np.float32))


class TabularDataset(torch.utils.data.Dataset):
    """(empty image, tabular, target) for the tabular-only model, so the training loop is shared; the others' base."""

    def __init__(self, tabular, targets):
        self.tabular = torch.as_tensor(np.asarray(tabular, np.float32))
        self.targets = torch.as_tensor(np.asarray(targets))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(0), self.tabular[i], self.targets[i]


class ADDataset(TabularDataset):
    """(image, tabular, target) for AD (Sec. 3.5.2, 4.3.6) from (X, Y, Z) volumes and `crops`, or (2, D, H, W)
    pairs. Training: one side drawn, image (1, D, H, W); evaluation: both, image (2, 1, D, H, W)."""

    def __init__(self, images, tabular, labels, crops=None, train=True):
        assert len(images) == len(tabular) == len(labels)
        super().__init__(tabular, np.asarray(labels, np.int64))
        self.images, self.crops, self.train = images, crops, train

    def __getitem__(self, i):
        vol = self.images[i]
        if vol.ndim == 3 and self.crops is None:
            raise UserError(f"item {i}: a whole volume {tuple(vol.shape)} needs `crops` "
                            "(or a cache with the crops as transform)")
        pair = self.crops(vol) if vol.ndim == 3 else vol                           # (2, D, H, W)
        img = (image_tensor(pair[int(torch.randint(2, (1,)))])[None] if self.train  # one side, (1, D, H, W)
               else image_tensor(pair)[:, None])                                    # both, (2, 1, D, H, W)
        return img, self.tabular[i], self.targets[i]


class BrainAgeDataset(TabularDataset):
    """(image (1, D, H, W), sex one-hot (2,), age) for brain age (Sec. 3.5.1)."""

    def __init__(self, images, sex_onehot, age):
        assert len(images) == len(sex_onehot) == len(age)
        super().__init__(sex_onehot, np.asarray(age, np.float32))
        self.images = images

    def __getitem__(self, i):
        return image_tensor(self.images[i])[None], self.tabular[i], self.targets[i]


# ---- the commands: ADNIMERGE in, a cohort checked before a long run, its boxes previewed -----------------------

def from_adnimerge(path, out, visit="bl", dx_column=None, group_map=None):
    """One row per subject of an ADNIMERGE export (one row per visit): the `visit` row, its diagnosis mapped to
    CN / MCI / AD (others dropped with a count), AGE the age at that visit (AGE + Years_bl). -> a report line."""
    dx_column = dx_column or ("DX_bl" if visit.lower() == "bl" else "DX")
    years_bl = () if visit.lower() == "bl" else ("Years_bl",)    # AGE is the baseline age on every visit's row
    rows, _ = read_csv_rows(path, ("PTID", "VISCODE", dx_column) + AD_ATTRIBUTES + years_bl)
    kept, seen, dropped = [], set(), collections.Counter()
    subjects = {r["PTID"] for _, r in rows if r["PTID"]}
    for line, r in rows:
        if r["VISCODE"].strip().lower() != visit.lower() or not r["PTID"] or r["PTID"] in seen:
            continue
        seen.add(r["PTID"])
        g = diagnosis(r[dx_column], group_map)
        if g is None:
            dropped[r[dx_column]] += 1
            continue
        row = {"Subject": r["PTID"], "Group": g, **{a: r[a] for a in AD_ATTRIBUTES}}
        years = read_cell(path, line, r, "Years_bl", lambda _, s: parse_value(s))     # NaN where absent or empty
        age = read_cell(path, line, r, "AGE")
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


def _gray(plane):
    """A 2D slice -> (H, W, 3) uint8, 1st-99th percentile window, anterior / superior at the top."""
    lo, hi = np.percentile(plane, [1, 99])
    return np.repeat((np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).T[::-1, :, None], 3, 2)


def preview_crops(volume, crops, base):
    """<base>_boxes.png: the boxes (left red, right green) on axial and coronal mid-slices; <base>_crops.png: theirs."""
    pair = crops(volume)                                     # (2, D, H, W); refused if the boxes do not fit
    side_by_side = lambda tiles: np.concatenate([np.pad(t, ((0, max(u.shape[0] for u in tiles) - t.shape[0]),
                                                            (0, 2), (0, 0))) for t in tiles], 1)
    panels = []
    for axis in (2, 1):                                                            # axial (z), coronal (y)
        img = _gray(np.take(volume, crops.left_start[axis] + crops.size[axis] // 2, axis))
        a, b = [d for d in range(3) if d != axis]                                  # (x, y) or (x, z)
        for start, colour in ((crops.left_start, (255, 0, 0)), (crops.right_start, (0, 255, 0))):
            x0, x1 = start[a], start[a] + crops.size[a] - 1
            r0, r1 = img.shape[0] - 1 - (start[b] + crops.size[b] - 1), img.shape[0] - 1 - start[b]
            img[[r0, r1], x0:x1 + 1], img[r0:r1 + 1, [x0, x1]] = colour, colour
        panels.append(img)
    write_png(side_by_side(panels), base + "_boxes.png")
    write_png(side_by_side([_gray(np.take(side, side.shape[axis] // 2, axis)) for side in pair for axis in (2, 1)]),
              base + "_crops.png")


def matplotlib_or_none():
    """matplotlib on the Agg backend, or None: an optional dependency, imported here so the project runs without."""
    try:
        import matplotlib
    except ImportError:
        return None
    if "matplotlib.pyplot" not in sys.modules:    # before pyplot: no display, the same PNGs everywhere
        matplotlib.use("Agg")                       # (after it, switching would close a notebook's open figures)
    return matplotlib


def write_png(rgb, path):
    """(H, W, 3) uint8 -> an RGB PNG, atomically, written with zlib (no optional dependency)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))                 # filter 0 on every row
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""), path)


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
        return print(from_adnimerge(a.csv, a.out, a.visit, a.dx_column, parse_group_map(a.group_map)))
    ad, about, tail = a.cmd == "check-ad", "", ""
    if ad:
        check_number("--preview-n", a.preview_n, least=1)
        if a.preview and a.no_images:
            raise UserError(f"--preview {a.preview}: previews need the images; drop --no-images")
        t = read_ad_table(a.csv, a.image_dir, need_images=not a.no_images, group_map=parse_group_map(a.group_map))
        if t.skipped:
            print(skipped_summary(t))
    else:
        t = read_brain_age_table(a.csv, a.image_dir, need_images=not a.no_images)
    shape, (crops, own) = None, (load_crops(a.crops, a.csv), crops_path(a.crops, a.csv)) if ad else (None, None)
    if t.image_paths:          # every header (one shape, one voxel size), then every image decoded and validated
        shape = check_image_geometry(t.image_paths, t.subjects)[0]
        if crops and (own or a.preview):        # a preview draws the boxes: they must fit
            crops.check(shape, own or "--preview with the default MNI152 1 mm boxes (no crops.json; give --crops FILE)")
        fits = crops and all(s + d <= n for st in (crops.left_start, crops.right_start)
                             for s, d, n in zip(st, crops.size, shape))
        shown = Progress("checking the images", len(t.subjects), "images", a.quiet)
        for p, s in zip(t.image_paths, t.subjects):
            volume = load_volume(p, s, expected_shape=shape)
            if fits:
                crops(volume, _where(p, s))      # each box holds signal
            shown.advance()
        shown.finish()
        if crops and not fits:
            warn(f"no crops.json: the default MNI152 1 mm boxes do not fit images {shape}; image models "
                 f"need --crops FILE")
    if ad:
        if a.preview and t.image_paths:
            os.makedirs(a.preview, exist_ok=True)
            names = output_names(t.subjects[:a.preview_n])   # inside --preview whatever the Subject (`../../x`)
            for p, s, name in zip(t.image_paths, t.subjects, names):
                preview_crops(load_volume(p, s), crops, os.path.join(a.preview, name))
            renamed = [f"{s!r} as {n}" for s, n in zip(t.subjects, names) if s != n]
            print(f"wrote {2 * len(names)} PNGs to {a.preview}: <Subject>_boxes.png (axial and "
                  f"coronal mid-slices, left box red, right box green) and <Subject>_crops.png (both crops)"
                  + (f"; written under a safe file name: {', '.join(renamed)}" if renamed else ""))
        counts = {c: int((t.labels == k).sum()) for k, c in enumerate(CLASS_NAMES)}
        if not all(counts.values()):
            warn(f"{a.csv}: no {' or '.join(c for c, n in counts.items() if not n)} subjects: train_ad.py needs "
                 f"every class in every subset (--classes 2 for CN vs AD)")
        empty = {c: sum(math.isnan(parse_attribute(c, r[c])) for r in t.raw) for c in AD_ATTRIBUTES}
        about = f" ({', '.join(f'{c} {n}' for c, n in counts.items())})"
        tail = ", empty cells: " + ", ".join(f"{c} {k}" + (f" ({k / len(t.raw):.0%})" if k else "")
                                             for c, k in empty.items())
    age = t.age[~np.isnan(t.age)]                  # AD: every AGE cell may be empty
    print(f"ok: {a.csv}: {len(t.subjects)} subjects{about}, {int((t.sex == 0).sum())} male, age "
          + (f"{age.mean():.1f} +- {age.std():.1f} ({age.min():.0f}-{age.max():.0f})" if age.size else "unknown")
          + tail + (f", images {shape}" if shape else ""))


if __name__ == "__main__":
    run_cli(main)
