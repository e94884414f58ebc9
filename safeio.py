"""What every script promises at its edges: bad input stops with one `error:` line, and no file is half-written.

    UserError    bad input or a bad request from the user (a table, an image, an option, a run folder);
                 its message is one line naming the file, row, column or option
    run_cli      a script's __main__: UserError / OSError -> `error: <one line>` on stderr, exit status 2;
                 Ctrl-C / SIGTERM -> `interrupted (...)` in one line (what is kept, the command to resume),
                 exit status 130 / 143 as a shell reports them (128 + the signal's number)
    atomic_path  write to a temporary name beside the target, rename onto it only when complete; a full disk or
                 an unwritable folder is a UserError naming the folder and the bytes the file needed
    write_json, write_csv, write_text, write_bytes   the atomic writers the scripts use (JSON: NaN/inf -> null)
    spreadsheet_safe  a CSV cell a spreadsheet would run as a formula, made text (write_csv's for_people)
    check_output  an output file named by an option that is a folder or one of the command's inputs: refused
    warn         a legitimate but odd input: one `warning:` line on stderr, the run goes on
    check_number a numeric option within its range, else a UserError naming the option
    ArgumentParser  argparse's parser whose errors are a UserError too (one line, not usage + error)
    duration_text  a duration as a person says it: '45 s', '3 min 10 s', '2 h 5 min' (every progress line's)
    Progress     progress lines of a long job (count, share, pace, time left; a final line), silenced by quiet
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
