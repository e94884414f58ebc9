"""A run folder holds one run, always: claimed by one live process at a time, refused to a new run while it holds one.

The training scripts claim their run's folder (`claim_run_folder`) before they decode, train or write
anything, and hold it until the run ends, however it ends. A run folder is what predict.py, evaluate.py
and run-protocol read a run from (runs.finished: its metrics.json), so a second run's checkpoints beside
a first run's metrics would be taken for a finished run that never was.
"""
import contextlib
import os
import socket

try:
    import fcntl
except ImportError:  # not on Windows: run folders are not locked there (lock_folder warns)
    fcntl = None

import torch

import distributed
from safeio import UserError, warn

FINISHED_FILES = ("metrics.json", "predictions.npz", "logits.npz", "calibration.json")  # its final best.pt's
RUN_FILES = ("best.pt", "last.pt", "log.csv") + FINISHED_FILES                          # what a run writes
LOCK_NAME = ".lock"


@contextlib.contextmanager
def claim_run_folder(run_dir, resume):
    """run_dir for this run alone while the block runs: a run folder holds one run, always.

    Refused (UserError, before anything is decoded, trained or written):
    - a folder in use by a live process: a run holds an exclusive flock on <run_dir>/.lock while it
      runs (under torchrun, rank 0 does), and the OS drops it when the process ends however it ends,
      kill -9 included, so a dead run never leaves its folder locked;
    - without --resume, a folder that holds a run's files, finished (metrics.json) or not (last.pt):
      a new run would leave its checkpoints beside the old run's metrics and predictions, which
      predict.py and evaluate.py would then take for its own. Refused rather than moved aside: which
      run to keep is the user's to say (--resume continues it, another --out starts a new one);
    - with --resume, a folder with no last.pt to continue but another run's files.
    With --resume, training.fit removes a finished run's metrics.json and predictions.npz before it trains it
    further. On release the lock file goes, and the folders this created if they are still empty."""
    fd, created, refusal = None, [], None
    try:
        if distributed.is_main():
            created = make_folders(run_dir)
            fd, holder = lock_folder(run_dir)
            if fd is None and holder is not None:
                refusal = f"{run_dir}: in use by another training process ({holder}); wait for it to end, or " \
                          f"use another --out"
            else:
                refusal = occupied(run_dir, resume)
        refusal = distributed.first_reported(refusal)      # torchrun: rank 0's verdict is every process's
        if refusal:
            raise UserError(refusal)
        yield
    finally:
        release_folder(run_dir, fd, created)


def occupied(run_dir, resume):
    """Why run_dir cannot take a new run (without --resume) or be resumed (with it), in words; None if it can."""
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(run_dir, f))]
    if not held or resume and "last.pt" in held:
        return None
    if resume:
        return f"{run_dir}: --resume: no last.pt to continue from, and the folder holds another run's " \
               f"{', '.join(held)}; use another --out, or delete them"
    if "metrics.json" in held:
        what, hint = f"a finished run ({', '.join(held)})", "use --resume to train it further (a larger --epochs)"
    elif "last.pt" in held:
        what = f"an unfinished run ({saved_epoch(os.path.join(run_dir, 'last.pt'))})"
        hint = "use --resume to continue it"
    else:
        what, hint = f"another run's {', '.join(held)}", "delete them"
    return f"{run_dir}: holds {what}, and a new run would mix with it; {hint}, or use another --out for the new run"


def saved_epoch(path):
    """'last.pt after epoch N' of a checkpoint, or its bare name when it cannot be read."""
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
        return f"{os.path.basename(path)} after epoch {epoch + 1}"
    except Exception:
        return os.path.basename(path)


def make_folders(run_dir):
    """os.makedirs(run_dir) -> the folders it created, deepest first (release_folder removes them if left empty)."""
    created, d = [], os.path.abspath(run_dir)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(run_dir, exist_ok=True)
    return created


def lock_folder(run_dir):
    """An exclusive flock on <run_dir>/.lock, with this process's id written in it -> (fd, None); (None, "pid
    N on HOST") when a live process holds it; (None, None), with a warning, where the file system has no locks.

    The file is removed on release (release_folder), so a process that opened it just before may lock a
    removed file: the lock counts only when the name still leads to the file locked, else it is taken again."""
    path = os.path.join(run_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(0, "no fcntl on this system")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            return None, holder or "a process that has just started"
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            warn(f"{run_dir}: cannot lock the run folder ({exc.strerror}): a second run into it would not be refused")
            return None, None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd, None


def release_folder(run_dir, fd, created):
    """The lock of lock_folder dropped and its file removed; the folders make_folders created removed if empty."""
    if fd is not None:
        path = os.path.join(run_dir, LOCK_NAME)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.remove(path)                      # still locked: no one else can have taken it
        os.close(fd)
    for d in created:
        try:
            os.rmdir(d)
        except OSError:                              # not empty (the run wrote in it), or gone
            break


def discard_finished_outputs(run_dir):
    """A finished run resumed to train further: its metrics.json (first: runs.finished reads it) and
    predictions.npz describe a best.pt that is about to change, so they go (rank 0 removes them); the run writes
    them anew when it ends. -> a line saying so, or None when there were none."""
    gone = [f for f in FINISHED_FILES if os.path.isfile(os.path.join(run_dir, f))]
    if distributed.is_main():
        for f in gone:
            os.remove(os.path.join(run_dir, f))
    return f"{run_dir}: trains further: {' and '.join(gone)} of the finished run removed until it ends" if gone \
        else None
