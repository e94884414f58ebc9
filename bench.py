"""Speed and memory, measured as ratios in one run (never as a test).

    python bench.py            # both tables, at the paper's shapes
    python bench.py --quick    # smaller shapes, a smoke run

(a) each hyperlayer, forward + backward, in both exact formulations, against the naive hypernetwork:
    one generator call and one F.linear / F.conv3d per sample with that sample's weights.
(b) a HyperFusion train step (forward, loss, backward, Adam) against its image-only backbone:
    time, and peak memory (CUDA: max_memory_allocated; CPU: the peak resident set size a fresh
    subprocess reaches during the steps, above what it held before building the model).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import HyperConv3d, HyperLinear
from models import build_model


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


def train_step_measure(task, name, shape, batch, steps, device):
    """Runs in a fresh process: median train-step time and peak memory of one model."""
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

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(image, tabular), target).backward()
        opt.step()

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller shapes for a smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:
        print(json.dumps(train_step_measure(**json.loads(args.child))))
        return
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n(a) hyperlayer forward+backward, ms (median); speed-up = naive per-sample loop / batched")
    print("| case | factorised | materialised | naive loop | speed-up factorised | speed-up materialised |")
    print("|---|---|---|---|---|---|")
    for r in bench_hyperlayers(args.quick, device):
        print(f"| {r['case']} | {r['factorised']:.1f} | {r['materialised']:.1f} | {r['naive']:.1f} | "
              f"{r['speedup_factorised']:.1f}x | {r['speedup_materialised']:.1f}x |")
    print("\n(b) train step (forward, loss, backward, Adam), HyperFusion vs its image-only backbone")
    print("| case | imaging s | HyperFusion s | time ratio | imaging MB | HyperFusion MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in bench_train_steps(args.quick, device):
        print(f"| {r['case']} | {r['imaging_s']:.2f} | {r['hyperfusion_s']:.2f} | {r['time_ratio']:.3f} | "
              f"{r['imaging_mb']:.0f} | {r['hyperfusion_mb']:.0f} | {r['memory_ratio']:.3f} |")


if __name__ == "__main__":
    main()
