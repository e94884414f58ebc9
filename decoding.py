"""The image cache's decoding processes: started, fed, stopped, and never outliving their parent.

    decoding_processes(cache, workers)   `workers` spawned processes that decode entries of `cache`; leaving
                                         the block by an exception (Ctrl-C, a bad image) stops them at once
    decode(pool, items, workers)         the items, each yielded once its entry is written, in order
    stop_signals_interrupt()             meanwhile SIGTERM interrupts this process as Ctrl-C does
    removed_if_stopped(tmp)              the file a decoding process writes meanwhile, removed if it is stopped
A decoding process ignores Ctrl-C (its parent stops it), removes the file it was writing when stopped, and
ends when its parent ends, by any signal, kill -9 included. imagecache.ImageCache uses this; it imports
nothing of this repository and no torch, so a process starts in a second.
"""
import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time


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
