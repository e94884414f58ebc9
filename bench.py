"""Speed and memory, measured as ratios in one run (never as a test), and the paper's protocols' wall time from them.

    python bench.py                  # the three tables, at the paper's shapes
    python bench.py --quick          # smaller shapes, a smoke run
    python bench.py --device cuda    # on the GPU: the paper's batch sizes, mixed precision as training uses it
    python gpu_check.py --device cuda                # the prepared GPU check (gpu_check.py; --check here runs it)
    python bench.py --data-scale --subjects 96       # full-size images on this CPU machine (below)

(a) each hyperlayer, forward + backward, in both exact formulations, against the naive hypernetwork:
    one generator call and one F.linear / F.conv3d per sample with that sample's weights.
(b) a HyperFusion train step (forward, loss, backward, Adam) against its image-only backbone:
    time, and peak memory (CUDA: max_memory_allocated; CPU: the peak resident set size a fresh
    subprocess reaches during the steps, above what it held before building the model).
(c) training throughput per model as `training.fit` runs it (--precision auto: bfloat16 autocast where
    native, the grad scaler with float16): samples per second and peak memory of AD imaging / HyperFusion at 64x96x64
    and brain age imaging / HyperFusion at 90x120x99 (B = 32 and 64 on CUDA as Table 1, 4 and 2 on CPU), the
    loader's samples per second reading the same shapes from an ImageCache with the workers training
    would use, and the wall time of the paper's two protocols estimated from them.

--data-scale: N float32 .nii.gz per task (synthetic heads at AD's MNI152 1 mm 182x218x182, cropped as the AD
cache holds them, and brain age's 90x120x99): ImageCache.prepare from scratch per --decode-workers W (images/s,
per worker; a spawned pool's start timed alone), the entries' size per subject and cohort (float16, float32),
the training loader's samples/s with 0, 1, 2 workers (Table 1's batches); the machine, its load, the command.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import data
    import synthetic     # (and scipy): --data-scale's images
except ImportError as error:
    data, synthetic, DATA_MISSING = None, None, error
from layers import HyperConv3d, HyperLinear
from models import build_model
from training import autocast, resolve_precision
from training import loader_workers, make_loader


def timeit(fn, repeats, warmup=2, device="cpu"):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def naive_hyperlayer(layer, x, tabular, functional, **kwargs):
    """The per-sample hypernetwork: generate sample b's weights, then one layer call for sample b."""
    e = layer.hypernet(tabular)  # the embedding sees the batch (its batch norm needs one)
    outs = []
    for b in range(x.shape[0]):
        w, bias = layer.hypernet.generate(e[b:b + 1])
        outs.append(functional(x[b:b + 1], w.view(layer.weight_shape), bias.view(-1), **kwargs))
    return torch.cat(outs)


def bench_hyperlayers(quick, device):
    """Table (a): the paper's two hyperlayer shapes."""
    torch.manual_seed(0)
    cases = [
        ("brain-age linear1 39424->16, k=1, B=64",
         lambda mode: HyperLinear(39424, 16, nn.Linear(2, 1), 1, relu_follows=True, mode=mode),
         (16 if quick else 64, 39424), 2, F.linear, {}),
        ("AD block4 downsample 1x1x1 128->256 on 8x12x8, k=8, B=32",
         lambda mode: HyperConv3d(128, 256, 1, 2, 0, nn.Sequential(nn.Linear(15, 8), nn.BatchNorm1d(8), nn.PReLU()),
                                  8, mode=mode),
         (8 if quick else 32, 128, 8, 12, 8), 15, F.conv3d, dict(stride=2)),
    ]
    rows = []
    for title, make, xshape, n_tab, functional, kwargs in cases:
        x = torch.randn(*xshape, device=device, requires_grad=True)
        tabular = torch.randn(xshape[0], n_tab, device=device)
        times = {}
        for mode in ("factorised", "materialised"):
            layer = make(mode).to(device)
            times[mode] = timeit(lambda: layer(x, tabular).sum().backward(), 3 if quick else 10, device=device)
        layer = make("materialised").to(device)
        times["naive"] = timeit(lambda: naive_hyperlayer(layer, x, tabular, functional, **kwargs).sum().backward(),
                                3 if quick else 10, device=device)
        rows.append(dict(case=title, **{k: v * 1e3 for k, v in times.items()},
                         speedup_factorised=times["naive"] / times["factorised"],
                         speedup_materialised=times["naive"] / times["materialised"]))
    return rows


def train_step_measure(task, name, shape, batch, steps, device, amp=False, precision=None, channels_last=False,
                       compile=False, warmup=1, threads=None, ready=None, go=None, duration=None):
    """Runs in a fresh process: median train-step time and peak memory of one model.

    amp: autocast as fit trains; precision "fp32" / "bf16" overrides it; channels_last and compile as
    fit's --channels-last and --compile. With duration (seconds), the steps after warm-up are counted over
    that wall time instead, starting once the file `go` exists (the file `ready` is written first), so that
    K processes sharing a GPU are timed together: seconds is then the mean time per step."""
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True                  # as training.setup_device
    n_tab = 2 if task == "brain-age" else 15
    image = torch.randn(batch, 1, *shape, device=device)
    image = image.contiguous(memory_format=torch.channels_last_3d) if channels_last else image
    tabular = (torch.eye(2)[torch.arange(batch) % 2] if task == "brain-age" else torch.randn(batch, n_tab)).to(device)
    target = (torch.rand(batch) * 80 if task == "brain-age" else torch.arange(batch) % 3).to(device)
    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(task, name, image_shape=shape if task == "brain-age" else None, n_tabular=n_tab).to(device)
    model = model.to(memory_format=torch.channels_last_3d) if channels_last else model
    net = torch.compile(model) if compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = F.mse_loss if task == "brain-age" else F.cross_entropy
    dev = torch.device(device)
    precision = precision or (fit_precision(device) if amp else "fp32")
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev, precision):
            loss = loss_fn(net(image, tabular).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if duration is None:
        seconds = timeit(step, steps, warmup=warmup, device=device)
    else:
        for _ in range(warmup):
            step()
        _sync(device)
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < duration:
            step()
            n += 1
        _sync(device)
        seconds = (time.perf_counter() - t) / n
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return dict(seconds=seconds, peak_mb=peak)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def bench_train_steps(quick, device):
    """Table (b): each HyperFusion model against its image-only backbone, each in its own process."""
    cases = [("ad", (32, 48, 32) if quick else (64, 96, 64), 4 if quick else 8),
             ("brain-age", (45, 60, 50) if quick else (90, 120, 99), 2 if quick else 4)]
    rows = []
    for task, shape, batch in cases:
        result = {}
        for name in ("imaging", "hyperfusion"):
            args = json.dumps(dict(task=task, name=name, shape=shape, batch=batch, steps=2 if quick else 5,
                                   device=device))
            out = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True,
                                 check=True)
            result[name] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(dict(case=f"{task} {'x'.join(map(str, shape))} B={batch}",
                         imaging_s=result["imaging"]["seconds"], hyperfusion_s=result["hyperfusion"]["seconds"],
                         time_ratio=result["hyperfusion"]["seconds"] / result["imaging"]["seconds"],
                         imaging_mb=result["imaging"]["peak_mb"], hyperfusion_mb=result["hyperfusion"]["peak_mb"],
                         memory_ratio=result["hyperfusion"]["peak_mb"] / result["imaging"]["peak_mb"]))
    return rows


# ----------------------------------------------------------------------------------------------
# (c) Training throughput, the loader beside it, and the protocols' wall time

# brain age (Sec. 4.2): 26,691 scans, 80% train, 70 epochs, 5 versions, 3 models (concat costs what imaging does)
BRAIN_AGE_PROTOCOL = dict(scans=26_691, train_fraction=0.8, epochs=70, runs_per_model=5,
                          models={"imaging": "imaging", "concat": "imaging", "hyperfusion": "hyperfusion"})
# AD (Sec. 4.3): 2,120 subjects, 3 of 5 subsets train, 250 epochs, 3 seeds x 3 versions x 4 folds per model;
# concat, FiLM and DAFT cost what the backbone does, the tabular MLP nothing
AD_PROTOCOL = dict(scans=2_120, train_fraction=0.6, epochs=250, runs_per_model=3 * 3 * 4,
                   models={"imaging": "imaging", "concat": "imaging", "film": "imaging", "daft": "imaging",
                           "hyperfusion": "hyperfusion"})


def throughput_cases(quick, device):
    """(task, input shape, batch) of table (c): the paper's shapes; Table 1's batches on CUDA, small ones on CPU."""
    cuda = device == "cuda"
    return [("ad", (32, 48, 32) if quick else (64, 96, 64), 32 if cuda else 4),
            ("brain-age", (45, 60, 50) if quick else (90, 120, 99), 64 if cuda else 2)]


def loader_measure(task, shape, batch, device, n=None):
    """Samples per second of the training loader alone (make_loader, the workers training would use),
    reading `shape` images from an ImageCache of n synthetic volumes, timed on its second pass. A pass reads the n
    volumes over and over, so that every worker makes several batches of it (3 x workers batches, at least 4):
    with fewer batches than workers the pass times the latency of one batch, not the loader's rate."""
    dev = torch.device(device)
    workers = loader_workers(None, dev)
    n = n or max(2 * batch, 16)
    length = max(n, batch * max(4, 3 * workers))                  # samples a pass reads, cycling over the n
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"s{i}.nii") for i in range(n)]
        full = (2 * shape[0],) + tuple(shape[1:]) if task == "ad" else tuple(shape)   # AD: both boxes side by side
        for p in paths:
            data.save_nifti(rng.standard_normal(full).astype(np.float32), 1.0, p)
        crops = data.HippocampusCrops((0, 0, 0), (shape[0], 0, 0), tuple(shape)) if task == "ad" else None
        cache = data.ImageCache(paths, os.path.join(tmp, "cache"), "float16", transform=crops).prepare(progress=False)
        labels = np.arange(n) % 3
        ds = (data.ADDataset(cache, rng.standard_normal((n, 15)), labels) if task == "ad" else
              data.BrainAgeDataset(cache, np.eye(2)[labels % 2], 20.0 + labels))
        ds = torch.utils.data.Subset(ds, [i % n for i in range(length)])
        return dict(samples_s=loader_rate(ds, batch, workers, dev), workers=workers, batches=length // batch)


def loader_rate(ds, batch, workers, dev):
    """Samples per second of the training loader (make_loader, shuffled) over `ds`, timed on its second pass."""
    loader = make_loader(ds, batch, workers, dev, shuffle=True)
    for _ in loader:                     # the first pass reads the files into the page cache, starts workers
        pass
    t, count = time.perf_counter(), 0
    for image, _, _ in loader:
        image = image.to(dev, non_blocking=True)
        count += len(image)
    _sync(dev.type)
    return count / (time.perf_counter() - t)


def bench_throughput(quick, device):
    """Table (c): per model samples/s and peak memory, each in its own process, and the loader's samples/s."""
    rows = []
    for task, shape, batch in throughput_cases(quick, device):
        loader = loader_measure(task, shape, batch, device)
        for name in ("imaging", "hyperfusion"):
            args = json.dumps(dict(task=task, name=name, shape=shape, batch=batch, steps=2 if quick else 5,
                                   device=device, amp=True))
            out = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True,
                                 check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(dict(task=task, model=name, shape="x".join(map(str, shape)), batch=batch,
                             samples_s=batch / r["seconds"], peak_mb=r["peak_mb"], loader_s=loader["samples_s"],
                             workers=loader["workers"]))
    return rows


def protocol_hours(rows, task, protocol):
    """Training wall time of a protocol on one device, in hours, from the measured samples/s of each model."""
    rate = {r["model"]: r["samples_s"] for r in rows if r["task"] == task}
    samples = protocol["scans"] * protocol["train_fraction"] * protocol["epochs"] * protocol["runs_per_model"]
    return sum(samples / rate[measured] for measured in protocol["models"].values()) / 3600


def print_throughput(rows, quick, device):
    print("\n(c) training throughput (forward, loss, backward, Adam; autocast as training uses it), "
          "and the loader alone")
    print("| task | model | input | B | samples/s | peak MB | loader samples/s (workers) | loader / model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['model']} | {r['shape']} | {r['batch']} | {r['samples_s']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['loader_s']:.1f} ({r['workers']}) | {r['loader_s'] / r['samples_s']:.0f}x |")
    for task in ("ad", "brain-age"):
        im, hf = [next(r for r in rows if r["task"] == task and r["model"] == m) for m in ("imaging", "hyperfusion")]
        print(f"{task}: HyperFusion / backbone: time per sample {im['samples_s'] / hf['samples_s']:.3f}, "
              f"peak memory {hf['peak_mb'] / im['peak_mb']:.3f}")
    ba, ad = protocol_hours(rows, "brain-age", BRAIN_AGE_PROTOCOL), protocol_hours(rows, "ad", AD_PROTOCOL)
    print(f"\nEstimated training wall time of the paper's protocols on this device ({device}), one run at a time"
          + (" (--quick: smaller inputs than the paper's, so these are underestimates)" if quick else "") + ":")
    print(f"- brain age: 26,691 scans x 80% train x 70 epochs x 5 versions x 3 models (concat at the imaging "
          f"rate): {ba:,.0f} h ({ba / 24:,.1f} days)")
    print(f"- AD: 2,120 subjects x 60% train x 250 epochs x (3 seeds x 3 versions x 4 folds) x 5 image models "
          f"(concat, FiLM, DAFT at the imaging rate; the tabular MLP and late fusion free): {ad:,.0f} h "
          f"({ad / 24:,.1f} days)")
    print("Assumptions: the measured steady-state rate of each model at the batch above; validation and test "
          "passes (forward only, 20-40% of the subjects per epoch) and data loading (overlapped) not counted; "
          "K processes on K devices (run-protocol --jobs K) divide these by about K.")


# ----------------------------------------------------------------------------------------------
# Reports as markdown and JSON (--data-scale here, gpu_check.py's check)

HERE = os.path.dirname(os.path.abspath(__file__))
fit_precision = lambda device: resolve_precision("auto", torch.device(device), quiet=True)   # training's default


def write_report(report, out, name, render):
    """report as <out>/<name>.json and, through render(report), <out>/<name>.md."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write(render(report))


def fmt_cell(v):
    return f"{v:,.3g}" if isinstance(v, float) else ("-" if v is None else str(v))


def markdown_rows(rows):
    """A list of dicts as the lines of one markdown table, a column per key."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt_cell(r.get(k)) for k in keys) + " |" for r in rows]


# ----------------------------------------------------------------------------------------------
# --data-scale: full-size images on one machine: first-use decode, the cache's size, the training loader

def data_scale(n=48, decode_workers=(1, 2), workers=(0, 1, 2), quick=False, steps=10):
    """Per task: ImageCache.prepare of n images from scratch (hash, decode, crop, write; a fresh folder per
    decode-workers count, processes even below PARALLEL_FROM) and a spawned pool's start alone, the entries'
    bytes, and loader_rate over the Dataset the training script builds (a Subset of the cache, its rows
    repeated to `steps` batches) -> report dict."""
    rng, dev, out = np.random.default_rng(0), torch.device("cpu"), dict(decode=[], cache=[], loader=[])
    tag, load = lambda shape: "x".join(map(str, shape)), lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())
    env = dict(cpu=next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                        platform.machine()), cores=os.cpu_count(), usable=len(os.sched_getaffinity(0)),
               torch=torch.__version__, threads=torch.get_num_threads(), load_before=load(),
               command=" ".join(["python", os.path.basename(sys.argv[0])] + sys.argv[1:]))
    start = {1: 0.0}
    for w in sorted(set(decode_workers) - {1}):   # a spawned pool alone: each process imports the main module
        t = time.perf_counter()                    # (bench.py, torch with it) as prepare's import train_*.py
        with concurrent.futures.ProcessPoolExecutor(w, multiprocessing.get_context("spawn")) as pool:
            list(pool.map(abs, range(w)))
        start[w] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        for task, shape, spacing, batch, crops in ([  # (task, image shape, voxel mm, Table 1's batch, AD crops)
                ("ad", (24, 28, 24), 1.0, 4, synthetic.synthetic_crops((24, 28, 24), (8, 12, 8))),
                ("brain-age", (12, 14, 12), 1.75, 4, None)] if quick else [
                ("ad", (182, 218, 182), 1.0, 32, data.HippocampusCrops.mni152_1mm()),
                ("brain-age", (90, 120, 99), 1.75, 64, None)]):
            grid, anatomy = synthetic.head_grid(shape), synthetic.head_anatomy(rng, 1, 1, 1, 0.06, 0.12)
            head, paths = synthetic.render_head(grid, anatomy, rng), [f"{tmp}/{task}{i:04d}.nii.gz" for i in range(n)]
            for p in paths:       # float32 as preprocess.py writes it (brain z-scored, zero outside), noise of its own
                data.save_nifti(np.where(head != 0, head + rng.normal(0, 0.1, shape).astype(np.float32), 0), spacing, p)
            for w in decode_workers:
                cache = data.ImageCache(paths, os.path.join(tmp, f"{task}-{w}"), "float16", transform=crops)
                cache.PARALLEL_FROM, t = 1, time.perf_counter()
                cache.prepare(progress=False, workers=w)
                s = time.perf_counter() - t
                out["decode"].append(dict(task=task, image=tag(shape), subjects=n, decode_workers=w, seconds=s,
                                          nii_gz_mb=sum(map(os.path.getsize, paths)) / n / 2 ** 20, images_s=n / s,
                                          images_s_per_worker=n / s / w, spawn_start_s=start[w],
                                          per_worker_after_start=n / (s - start[w]) / w if s > start[w] else None))
            f32 = data.ImageCache(paths[:2], os.path.join(tmp, f"{task}-f32"), "float32", transform=crops)
            for c in (cache, f32.prepare(progress=False)):
                b, scans = statistics.mean(map(os.path.getsize, map(c.entry, range(len(c))))), \
                    (AD_PROTOCOL if task == "ad" else BRAIN_AGE_PROTOCOL)["scans"]
                out["cache"].append(dict(task=task, entry=tag(c[0].shape), dtype=c.dtype, mb_per_subject=b / 2 ** 20,
                                         paper_subjects=scans, paper_cohort_gb=b * scans / 2 ** 30))
            idx = np.arange(steps * batch) % n
            ds = (data.ADDataset(torch.utils.data.Subset(cache, idx), rng.standard_normal((len(idx), 15)), idx % 3)
                  if task == "ad" else data.BrainAgeDataset(torch.utils.data.Subset(cache, idx),
                                                            data.sex_onehot(idx % 2), 20.0 + idx % 60))
            for w in workers:
                r = loader_rate(ds, batch, w, dev)
                out["loader"].append(dict(task=task, sample=tag(ds[0][0].shape), batch=batch, samples=len(ds),
                                          workers=w, samples_s=r, samples_s_per_worker=r / max(w, 1)))
    return dict(environment=dict(env, load_after=load()), **out)


def render_data_scale(report):
    lines = ["# bench.py --data-scale", "", ", ".join(f"{k} {v}" for k, v in report["environment"].items())]
    for name in ("decode", "cache", "loader"):
        lines += ["", f"## {name}", ""] + markdown_rows(report[name])
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes for a smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["a", "b", "c"], help="one table")
    p.add_argument("--check", action="store_true", help="the prepared GPU check: runs gpu_check.py with the same "
                   "--device, --quick, --out and --budget")
    p.add_argument("--out", help="--data-scale: folder of data_scale.md and .json (default none)")
    p.add_argument("--data-scale", action="store_true", help="full-size images: decode rate, cache size, "
                   "loader samples/s per worker (--quick: tiny shapes)")
    p.add_argument("--subjects", type=int, default=48, help="--data-scale: images written per task")
    p.add_argument("--decode-workers", type=int, nargs="+", default=[1, 2], help="--data-scale: prepare's workers")
    p.add_argument("--budget", type=float, default=600, help="--check: gpu_check.py's --budget")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:
        print(json.dumps(train_step_measure(**json.loads(args.child))))
        return
    if args.check:   # the old command: gpu_check.py, in its own process (it imports this file)
        sys.exit(subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--device", device,
                                 *(["--quick"] if args.quick else []), "--budget", str(args.budget),
                                 *(["--out", args.out] if args.out else [])]).returncode)
    if args.data_scale:
        report = data_scale(args.subjects, args.decode_workers, quick=args.quick)
        print(render_data_scale(report), end="")
        return args.out and write_report(report, args.out, "data_scale", render_data_scale)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "a"):
        print_hyperlayers(args.quick, device)
    if args.only in (None, "b"):
        print_train_steps(args.quick, device)
    if args.only in (None, "c"):
        print_throughput(bench_throughput(args.quick, device), args.quick, device)


def print_hyperlayers(quick, device):
    print("\n(a) hyperlayer forward+backward, ms (median); speed-up = naive per-sample loop / batched")
    print("| case | factorised | materialised | naive loop | speed-up factorised | speed-up materialised |")
    print("|---|---|---|---|---|---|")
    for r in bench_hyperlayers(quick, device):
        print(f"| {r['case']} | {r['factorised']:.1f} | {r['materialised']:.1f} | {r['naive']:.1f} | "
              f"{r['speedup_factorised']:.1f}x | {r['speedup_materialised']:.1f}x |")


def print_train_steps(quick, device):
    print("\n(b) train step (forward, loss, backward, Adam), HyperFusion vs its image-only backbone")
    print("| case | imaging s | HyperFusion s | time ratio | imaging MB | HyperFusion MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in bench_train_steps(quick, device):
        print(f"| {r['case']} | {r['imaging_s']:.2f} | {r['hyperfusion_s']:.2f} | {r['time_ratio']:.3f} | "
              f"{r['imaging_mb']:.0f} | {r['hyperfusion_mb']:.0f} | {r['memory_ratio']:.3f} |")


if __name__ == "__main__":
    main()
