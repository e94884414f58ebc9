"""Speed and memory, measured as ratios in one run (never as a test), and the paper's protocols' wall time from them.

    python bench.py                  # the three tables, at the paper's shapes
    python bench.py --quick          # smaller shapes, a smoke run
    python bench.py --device cuda    # on the GPU: the paper's batch sizes, mixed precision as training uses it

(a) each hyperlayer, forward + backward, in both exact formulations, against the naive hypernetwork:
    one generator call and one F.linear / F.conv3d per sample with that sample's weights.
(b) a HyperFusion train step (forward, loss, backward, Adam) against its image-only backbone:
    time, and peak memory (CUDA: max_memory_allocated; CPU: the peak resident set size a fresh
    subprocess reaches during the steps, above what it held before building the model).
(c) training throughput per model as `training.fit` runs it (autocast on CUDA, the grad scaler with
    float16): samples per second and peak memory of AD imaging / HyperFusion at 64x96x64 and brain
    age imaging / HyperFusion at 90x120x99 (B = 32 and 64 on CUDA as Table 1, 4 and 2 on CPU), the
    loader's samples per second reading the same shapes from an ImageCache with the workers training
    would use, and the wall time of the paper's two protocols estimated from them.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from layers import HyperConv3d, HyperLinear
from models import build_model
from training import amp_dtype, autocast, loader_workers, make_loader


def timeit(fn, repeats, warmup=2, device="cpu"):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
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


def train_step_measure(task, name, shape, batch, steps, device, amp=False):
    """Runs in a fresh process: median train-step time and peak memory of one model (amp: as fit trains)."""
    torch.manual_seed(0)
    n_tab = 2 if task == "brain-age" else 15
    image = torch.randn(batch, 1, *shape, device=device)
    tabular = (torch.eye(2)[torch.arange(batch) % 2] if task == "brain-age" else torch.randn(batch, n_tab)).to(device)
    target = (torch.rand(batch) * 80 if task == "brain-age" else torch.arange(batch) % 3).to(device)
    rss_before = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_model(task, name, image_shape=shape if task == "brain-age" else None, n_tabular=n_tab).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = F.mse_loss if task == "brain-age" else F.cross_entropy
    dev = torch.device(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype(dev) == torch.float16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev) if amp else torch.autocast(device, enabled=False):
            loss = loss_fn(model(image, tabular).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    seconds = timeit(step, steps, warmup=1, device=device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return dict(seconds=seconds, peak_mb=peak)


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
    reading `shape` images from an ImageCache of n synthetic volumes, over two passes."""
    dev = torch.device(device)
    workers = loader_workers(None, dev)
    n = n or max(2 * batch, 16)
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
        loader = make_loader(ds, batch, workers, dev, shuffle=True)
        for _ in loader:                     # the first pass reads the files into the page cache, starts workers
            pass
        t, count = time.perf_counter(), 0
        for image, _, _ in loader:
            image = image.to(dev, non_blocking=True)
            count += len(image)
        if device == "cuda":
            torch.cuda.synchronize()
        return dict(samples_s=count / (time.perf_counter() - t), workers=workers)


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes for a smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["a", "b", "c"], help="one table")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:
        print(json.dumps(train_step_measure(**json.loads(args.child))))
        return
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
