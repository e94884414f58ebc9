"""Independent training runs launched as separate processes, K at a time, one GPU each (run-protocol --jobs K).

The paper's AD protocol is 216 runs of a small model (Sec. 4.3.6): on several GPUs one run per GPU
beats splitting each run over all of them. Each run here is its training script started with the
same options the serial runner parses in-process, in its own process; a run may wait for another
(HyperFusion for the tabular-only MLP of its split seed, version and fold, whose embedding it starts
from). With `gpus` each process sees one GPU (CUDA_VISIBLE_DEVICES); without, each gets cores / K
threads (OMP_NUM_THREADS, unless set).
"""
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from safeio import Progress, UserError


@dataclass
class Job:
    run_dir: str
    command: list                  # [python, script, options...]
    after: str = None              # run_dir of a job that must finish first (None: none)
    kind: str = ""                 # what it trains (the model): the time left is estimated per kind (Progress)
    label: str = None              # how its progress line names it (None: run_dir)


def gpu_masks(gpus, visible_count, environ=None):
    """--gpus indices -> the CUDA_VISIBLE_DEVICES of each slot's process. An index counts among the GPUs this
    process sees: under CUDA_VISIBLE_DEVICES=4,5,6,7, --gpus 0,1 means physical GPUs 4 and 5. An index past the
    `visible_count` GPUs seen is refused in one line."""
    environ = os.environ if environ is None else environ
    mask = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    seen = mask if "CUDA_VISIBLE_DEVICES" in environ else [str(i) for i in range(visible_count)]
    seen = seen[:visible_count]
    bad = [g for g in gpus if not 0 <= g < len(seen)]
    if bad:
        where = (f" (CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in environ
                 else "")
        raise UserError(f"--gpus {','.join(map(str, gpus))}: GPU {bad[0]} does not exist here: {len(seen)} visible"
                        f"{where}, indices 0 to {len(seen) - 1}" if seen else
                        f"--gpus {','.join(map(str, gpus))}: no GPU is visible here{where}")
    return [seen[g] for g in gpus]


def run_jobs(jobs, k, gpus=None, poll_s=0.2, quiet=False):
    """Run every job, at most k at a time, each after its `after`; one line per job started and finished,
    the finished one with its final line and the time left (Progress.item_done, per kind; quiet: none). A
    failure stops new starts, lets the running ones finish, then raises UserError naming the run and the end of
    its output. gpus: the CUDA_VISIBLE_DEVICES values of the slots (gpu_masks). -> the run dirs in the order
    they finished.
    Interrupted (Ctrl-C, SIGTERM as safeio.Terminated, or any error here), it ends the runs it started
    (stop) before it goes on up, so that no training is left running with no one to wait for it."""
    if gpus is not None and not gpus:
        raise UserError("--gpus: give at least one GPU index, e.g. --gpus 0,1")
    running = {}
    try:
        return schedule(jobs, k, gpus, poll_s, running, quiet)
    except BaseException:
        stop(running)
        raise


def stop(running, grace_s=60):
    """SIGTERM to every running job (a training script saves nothing more and exits, last.pt intact), then
    SIGKILL to any still there after grace_s."""
    procs = [proc for _, _, (proc, _), _ in running.values()]
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def schedule(jobs, k, gpus, poll_s, running, quiet=False):
    """run_jobs's loop; `running` ({run_dir: (job, slot, (process, output), started)}) is its caller's to stop."""
    waiting, finished, failed = list(jobs), [], None
    slots = list(range(k))                                   # slot s runs on gpus[s % len(gpus)]
    pending = {j.run_dir for j in jobs}
    shown = Progress("train", None, "runs", quiet, kinds=[j.kind for j in jobs], parallel=k)
    while waiting or running:
        while failed is None and slots and waiting:
            job = next((j for j in waiting if j.after not in pending), None)
            if job is None:
                break
            waiting.remove(job)
            slot = slots.pop(0)
            running[job.run_dir] = (job, slot, start(job, slot, k, gpus), time.time())
            where = f" on GPU {gpus[slot % len(gpus)]}" if gpus else ""
            shown.say(f"started{where}: {job.run_dir}")
        if failed is not None and not running:
            break
        time.sleep(poll_s)
        for run_dir, (job, slot, (proc, out), started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run_dir]
            slots.append(slot)
            out.seek(0)
            lines = out.read().decode(errors="replace").strip().splitlines()
            out.close()
            if proc.returncode != 0:
                failed = failed or f"{run_dir}: training failed (exit {proc.returncode}): " + \
                    (lines[-1] if lines else "no output")
                continue
            pending.discard(run_dir)
            finished.append(run_dir)
            result = f": {lines[-1].replace(f' -> {run_dir}', '')}" if lines else ""    # its final line
            now = time.time()
            shown.item_done(job.kind, now - started, job.label or run_dir, result,
                            spent=sum(now - t for _, _, _, t in running.values()))
    if failed is not None:
        raise UserError(failed)
    return finished


def start(job, slot, k, gpus):
    """-> (the process of one job, the file that collects its output). gpus: CUDA_VISIBLE_DEVICES values."""
    env = dict(os.environ, LOCAL_WORLD_SIZE=str(k))          # k processes share this machine's cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // k)))
    command = job.command
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
        command = command + ["--device", "cuda"]
    out = tempfile.TemporaryFile()
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), out
