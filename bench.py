"""Speed, memory and accuracy of this code's choices, measured (never as a test), one report per command.

    python bench.py                         # ratios at the paper's shapes (--quick: tiny ones, a smoke run)
    python bench.py --device cuda           # the same on the GPU, at Table 1's batches
    python bench.py --compile               # HyperFusion's step also compiled (training's --compile)
    python bench.py precision --task ad --versions 0-7 --precision bf16 --device cuda   # paired accuracy
    python bench.py gpu-check --device cuda # the prepared GPU check, about 10 minutes (--budget seconds)
    python bench.py gpu-check --device cpu --quick                                      # its dry run

ratios: hyperlayers (forward + backward, both exact formulations against the naive per-sample hypernetwork);
throughput (a train step of each HyperFusion model and its backbone, each in a fresh process, at the paper's inputs
and Table 1's B = 32, 64 on CUDA, 4, 2 on CPU: samples/s, peak memory, FLOPs per sample (torch's FlopCounterMode)
and GFLOP/s as a fraction of this machine's float32 matmul and Conv3d rates, HyperFusion / backbone, the paper's
protocols' wall time from the rates); loader (the training loader alone at the same shapes).
precision: trains the demo's runs with the training scripts at fp32 and each --precision, one at a time on a GPU
(two at once pull their time ratio toward 1), --jobs at a time on a CPU, and gives per version the paired loss of
accuracy (AD test BA, Eq. 9, and AUC: fp32 minus it; brain-age MAE: it minus fp32), its mean, 95% Student t
interval and the time ratio (log.csv). Non-inferior, so that --precision auto may take it: over at least 8
versions the interval's upper end below 0.02 BA or 0.15 years.
gpu-check: tests (test_all.py's test_check_* of the device), the ratios' sections, then precision (bf16 where
native and fp16 against fp32, one version more at a time while the budget lasts; the CPU dry run pairs fp32 with
itself), in a report rewritten after each: a failing one keeps what it reported, the rest still run, one that
--budget cannot afford is skipped.
"""
import argparse
import csv
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

import data
import synthetic
from layers import HyperConv3d, HyperLinear
from models import build_model, tabular_embedding
from metrics import markdown_table
from training import (PRECISIONS, autocast, compiled, cores, loader_workers, make_loader, make_optimizer,
                      setup_device)

HERE = os.path.dirname(os.path.abspath(__file__))
# in their order: the paired precision runs last, as they take whatever time the budget has left
CHECK_SECTIONS = ("tests", "hyperlayers", "throughput", "loader", "precision")
MARGINS, MIN_VERSIONS = {"ad": 0.02, "brain-age": 0.15}, 8       # the largest loss of accuracy that counts as none
METRICS = {"ad": [("balanced_accuracy", +1), ("auc_macro", +1)], "brain-age": [("mae", -1)]}   # +1: higher is better
# The protocols' training samples per model (AD, Sec. 4.3: 2,120 x 60% x 250 epochs x 3 seeds x 3 versions x 4 folds;
# brain age, Sec. 4.2: 26,691 x 80% x 70 epochs x 5 versions), each image model at its backbone's or HyperFusion's cost
PROTOCOLS = {"ad": (2_120 * 0.6 * 250 * 36, ["imaging"] * 4 + ["hyperfusion"]),
             "brain-age": (26_691 * 0.8 * 70 * 5, ["imaging"] * 2 + ["hyperfusion"])}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(step, steps, warmup, device):
    """-> (median seconds of step() after `warmup` calls, CUDA peak MB of the timed steps or None)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device == "cuda":      # after the warm-up: cuDNN's algorithm trials (benchmark=True) are not training's memory
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None


def counted_flops(fn):
    """Floating-point operations of one fn() as torch's FlopCounterMode counts them: matmuls and convolutions,
    forward and backward, 2 per multiply-add, the same at every precision (Adam's elementwise updates count none)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- measured here or in fresh processes: hyperlayers, throughput, loader --------------------------------
def naive_hyperlayer(layer, x, tabular, functional, **kwargs):
    """The per-sample hypernetwork: generate sample b's weights, then one layer call for sample b."""
    e = layer.hypernet(tabular)  # the embedding sees the batch (its batch norm needs one)
    outs = []
    for b in range(x.shape[0]):
        w, bias = layer.hypernet.generate(e[b:b + 1])
        outs.append(functional(x[b:b + 1], w.view(layer.weight_shape), bias.view(-1), **kwargs))
    return torch.cat(outs)


def hyperlayers(quick, device):
    """ms per forward + backward at the paper's two hyperlayer shapes, and the speed-ups over the naive loop."""
    setup_device(device)                                         # TF32 off: at training's float32
    torch.manual_seed(0)
    rows = []
    for title, xshape, n_tab, functional, kwargs, make in [
            ("brain-age linear1 39424->16, k=1", (16 if quick else 64, 39424), 2, F.linear, {},
             lambda mode: HyperLinear(39424, 16, nn.Linear(2, 1), 1, relu_follows=True, mode=mode)),
            ("AD block4 downsample 1x1x1 128->256 on 8x12x8, k=8", (8 if quick else 32, 128, 8, 12, 8), 15,
             F.conv3d, dict(stride=2),
             lambda mode: HyperConv3d(128, 256, 1, 2, 0, tabular_embedding(15, 8), 8, mode=mode))]:
        x, ms = torch.randn(*xshape, device=device, requires_grad=True), {}
        tabular = torch.randn(xshape[0], n_tab, device=device)
        for mode in ("factorised", "materialised", "naive"):
            layer = make("materialised" if mode == "naive" else mode).to(device)
            fn = (lambda: naive_hyperlayer(layer, x, tabular, functional, **kwargs)) if mode == "naive" \
                else (lambda: layer(x, tabular))
            ms[mode] = 1e3 * run_steps(lambda: fn().sum().backward(), 3 if quick else 10, 2, device)[0]
        rows.append(dict(case=f"{title}, B={xshape[0]}", **ms, speedup_factorised=ms["naive"] / ms["factorised"],
                         speedup_materialised=ms["naive"] / ms["materialised"]))
    return dict(rows=rows)


def measure(task, name, shape, batch, steps, device, precision="fp32", warmup=1, compile=False):
    """In a fresh process: one model's train step (compile: training's --compile) -> median seconds, peak MB (CUDA
    allocated, CPU resident), flops (counted eager: compiling changes no arithmetic's count)."""
    dev = setup_device(device)                                   # cudnn.benchmark, TF32 off: as training
    image = torch.randn(batch, 1, *shape, device=dev)
    tabular = (torch.eye(2)[torch.arange(batch) % 2] if task == "brain-age" else torch.randn(batch, 15)).to(dev)
    target = (torch.rand(batch) * 80 if task == "brain-age" else torch.arange(batch) % 3).to(dev)
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
    model = build_model(task, name, image_shape=shape if task == "brain-age" else None).to(dev)   # 15 or 2 inputs
    opt, loss_fn = make_optimizer(model, 1e-4, 0.0, dev), F.mse_loss if task == "brain-age" else F.cross_entropy
    scaler, nets = torch.amp.GradScaler("cuda", enabled=precision == "fp16"), [model]

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(dev, precision):                           # training's --precision
            loss = loss_fn(nets[-1](image, tabular).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    flops = counted_flops(step)                                  # one step more, before the timed ones
    if compile:                                                  # compiled in the warm-up steps
        nets.append(compiled(model))
    seconds, peak = run_steps(step, steps, warmup, device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return dict(seconds=seconds, peak_mb=rss if peak is None else peak, flops=flops)


def reference(device, size, shape, batch):
    """In a fresh process: the machine's float32 GFLOP/s (FlopCounterMode's flops / median seconds, after a warm-up)
    of a size^3 matmul and of block1's first AD convolution, Conv3d(16, 32, 3) forward + backward after the first
    max-pool of `shape`: the rates a train step's GFLOP/s is a fraction of."""
    dev = setup_device(device)
    a, b = torch.randn(size, size, device=dev), torch.randn(size, size, device=dev)
    conv = nn.Conv3d(16, 32, 3, padding=1).to(dev)
    x = torch.randn(batch, 16, *(n // 2 for n in shape), device=dev, requires_grad=True)
    cases = dict(matmul=lambda: a @ b, conv3d=lambda: conv(x).sum().backward())
    return {k: counted_flops(fn) / run_steps(fn, 3, 1, device)[0] / 1e9 for k, fn in cases.items()}


def throughput(s, device, budget):
    """The throughput section (above) per case and precision; the reference rates first, in a fresh process too."""
    rows, ratios, hours = [], [], {}
    child = lambda **options: json.loads(run_commands([[sys.executable, os.path.join(HERE, "bench.py"), "--child",
                                                        json.dumps(options)]], 1, budget())[0].strip().splitlines()[-1])
    ref = child(reference=True, device=device, size=s["reference_size"], shape=s["cases"][0][1],   # the AD case's
                batch=s["cases"][0][2], threads=s["threads"])
    for precision in dict.fromkeys(["fp32"] + s["precisions"]):
        for task, shape, batch in s["cases"]:
            row = dict(task=task, precision=precision, shape="x".join(map(str, shape)), batch=batch)
            runs = [("imaging", False), ("hyperfusion", False)] + [("hyperfusion", True)] * (precision in s["compile"])
            for name, compile in runs:
                try:                       # one failing row leaves the others; measure() in a fresh process
                    r = child(task=task, name=name, shape=shape, batch=batch, steps=s["steps"], device=device,
                              precision=precision, warmup=s["warmup"], threads=s["threads"], compile=compile)
                    gflop_s = r["flops"] / r["seconds"] / 1e9
                    rows.append(dict(row, model=name + " compiled" * compile, samples_s=batch / r["seconds"],
                                     peak_mb=r["peak_mb"], gflop_sample=r["flops"] / batch / 1e9, gflop_s=gflop_s,
                                     **{f"of_{k}": gflop_s / v for k, v in ref.items()}))
                except Exception as e:
                    rows.append(dict(row, model=name + " compiled" * compile, error=f"{type(e).__name__}: {e}"[:600]))
            got = {r["model"]: r for r in rows[-len(runs):] if "samples_s" in r}
            im, hf, hfc = (got.get(m) for m in ("imaging", "hyperfusion", "hyperfusion compiled"))
            if im and hf:
                ratios.append(dict(row, time_ratio=im["samples_s"] / hf["samples_s"],
                                   memory_ratio=hf["peak_mb"] / im["peak_mb"],
                                   **({"compiled_speedup": hfc["samples_s"] / hf["samples_s"]} if hfc else {})))
        rate = {(r["task"], r["model"]): r["samples_s"] for r in rows if r["precision"] == precision and "peak_mb" in r}
        hours[precision] = {t: sum(n / rate[t, m] for m in models) / 3600 for t, (n, models) in PROTOCOLS.items()
                            if all((t, m) in rate for m in models)}
    return dict(rows=rows, ratios=ratios, hours=hours, reference_gflop_s=ref)


def loader(s, device, model_rows):
    """Samples/s of the training loader alone (make_loader as training, its second pass) reading an ImageCache of
    synthetic volumes, beside HyperFusion's fp32 rate; every worker makes several batches of a pass (3, at least 4
    in all): with fewer batches than workers a pass times the latency of one batch, not the loader's rate."""
    dev, rows, rng = torch.device(device), [], np.random.default_rng(0)
    workers = loader_workers(None, dev)
    for task, shape, batch in s["cases"]:
        n = max(2 * batch, 16)
        length = max(n, batch * max(4, 3 * workers))                  # samples a pass reads, cycling over the n
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, f"s{i}.nii") for i in range(n)]
            for p in paths:                                             # AD: both boxes side by side
                data.save_nifti(rng.standard_normal(((2 * shape[0],) + shape[1:]) if task == "ad" else shape)
                                .astype(np.float32), 1.0, p)
            crops = data.HippocampusCrops((0, 0, 0), (shape[0], 0, 0), tuple(shape)) if task == "ad" else None
            cache = data.ImageCache(paths, os.path.join(tmp, "c"), transform=crops).prepare(progress=False)
            ds = (data.ADDataset(cache, rng.standard_normal((n, 15)), np.arange(n) % 3) if task == "ad" else
                  data.BrainAgeDataset(cache, np.eye(2)[np.arange(n) % 2], 20.0 + np.arange(n) % 3))
            batches = make_loader(torch.utils.data.Subset(ds, [i % n for i in range(length)]), batch, workers, dev,
                                  shuffle=True)
            for _ in batches:                  # the first pass reads the files into the page cache; the timed one
                pass                           # starts its workers, as each training epoch does
            t, count = time.perf_counter(), sum(len(image.to(dev, non_blocking=True)) for image, _, _ in batches)
            sync(device)
            rate = count / (time.perf_counter() - t)
        m = next((m["samples_s"] for m in model_rows if (m["task"], m["model"], m["precision"]) ==
                  (task, "hyperfusion", "fp32") and "samples_s" in m), None)
        rows.append(dict(task=task, shape="x".join(map(str, shape)), batch=batch, workers=workers,
                         batches=length // batch, samples_s=rate, model_samples_s=m, loader_over_model=m and rate / m))
    return dict(rows=rows)


# ---- precision: the paired accuracy benchmark of a precision against float32 -------------------------------------
def run_commands(cmds, jobs, timeout):
    """Each command, `jobs` at a time (cores / jobs threads each) -> their outputs; a failure raises with its last
    line, the timeout (seconds for all) subprocess.TimeoutExpired; none is left running (a stopped run resumes)."""
    env, end, done = dict(os.environ), time.monotonic() + timeout, []
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores() // jobs)))
    for i in range(0, len(cmds), jobs):
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in cmds[i:i + jobs]]
        try:
            outs = [p.communicate(timeout=max(1, end - time.monotonic())) for p in procs]
        finally:
            for p in procs:
                p.kill() if p.poll() is None else None
        for c, p, (out, err) in zip(cmds[i:i + jobs], procs, outs):
            if p.returncode:
                raise RuntimeError(f"{' '.join(c[1:])}: exit {p.returncode}: " +
                                   ((err or out).strip().splitlines() or [""])[-1])
        done += [out for out, _ in outs]
    return done


def paired_loss(reference, other, sign):
    """Loss of accuracy per version (sign +1: higher is better) and its mean, 95% t interval, one-sided bound."""
    d = sign * (np.asarray(reference, float) - np.asarray(other, float))
    n, mean = len(d), float(d.mean())
    se, t2, t1 = ((d.std(ddof=1) / np.sqrt(n), stats.t.ppf(0.975, n - 1), stats.t.ppf(0.95, n - 1)) if n > 1
                  else (np.nan,) * 3)
    return dict(n=n, losses=d.tolist(), mean=mean, low=mean - t2 * se, high=mean + t2 * se, one_sided=mean + t1 * se)


def verdict(summary, margin):
    """non-inferior (the 95% interval's upper end below the margin, over >= MIN_VERSIONS versions), or why not."""
    n, high = summary["n"], summary["high"]
    return (f"not shown ({n} versions, {MIN_VERSIONS} needed)" if n < MIN_VERSIONS else
            f"non-inferior (upper bound {high:.3f} < {margin})" if high < margin else
            f"not shown (upper bound {high:.3f} >= {margin})")


def precision_pairs(task, vs, s, device, out, timeout):
    """Train fp32 and each precision's runs at versions vs, pair them -> the pairs' and versions' rows."""
    runs = list(dict.fromkeys(["fp32"] + s["precisions"]))
    schedule = f"{device}-{s['epochs'] or 'default'}-epochs"      # a --quick dry run's runs are not these
    folder = lambda p, v: os.path.join(out, task, schedule, p, f"v{v}")
    run_files = lambda f, name, model=None: [os.path.join(d, name) for d, _, names in os.walk(f)
                                             if name in names and model in (None, *os.path.relpath(d, f).split(os.sep))]
    script = os.path.join(HERE, "train_ad.py" if task == "ad" else "train_brain_age.py")
    demo = ["--split-seed", "0", "--fold", "2"] if task == "ad" else []                 # the demo command's
    todo = [[sys.executable, script, "--version", str(v), "--precision", p, "--device", device, "--out", folder(p, v),
             "--data-dir", s["data_dir"], "--quiet", "--resume", *demo] + ["--epochs", str(s["epochs"])] * bool(
                 s["epochs"]) for v in vs for p in runs if not run_files(folder(p, v), "metrics.json", "hyperfusion")]
    if todo:
        synthetic.builtin_cohort(task, s["data_dir"], quiet=True)   # generated once here, not by two runs at once
    run_commands(todo, 1 if device == "cuda" else s["jobs"], timeout)
    test = {(p, v): json.load(open(run_files(folder(p, v), "metrics.json", "hyperfusion")[0]))["test"]
            for p in runs for v in vs}
    seconds = {p: sum(float(row["seconds"]) for v in vs for f in run_files(folder(p, v), "log.csv")   # the MLP's too
                      for row in csv.DictReader(open(f))) for p in runs}
    pairs = []
    for p in s["precisions"]:
        for i, (key, sign) in enumerate(METRICS[task]):
            d = paired_loss([test["fp32", v][key] for v in vs], [test[p, v][key] for v in vs], sign)
            pairs.append(dict(task=task, precision=p, metric=key, versions=len(vs), mean_loss=d["mean"], low=d["low"],
                              high=d["high"], time_ratio=seconds["fp32"] / seconds[p],
                              verdict="(secondary)" if i else verdict(d, MARGINS[task])))
    return pairs, [dict(task=task, version=v, **{f"{p} {k}": float(test[p, v][k]) for p in runs for k, _ in
                                                 METRICS[task]}) for v in vs]


def precision(s, device, budget, out, report):
    """precision_pairs one version more at a time, the report rewritten after each: a stop keeps them."""
    done, section = {}, report["sections"].setdefault("precision", dict(status="running", seconds=0.0))
    for i, v in enumerate(s["versions"]):
        for task in s["tasks"]:
            try:
                done[task] = precision_pairs(task, s["versions"][:i + 1], s, device, os.path.join(out, "precision"),
                                             budget() - 30)
            except subprocess.TimeoutExpired:
                return dict(section, stopped=f"budget: {task} version {v} did not finish")
            section.update(rows=[r for t in done.values() for r in t[0]],
                           per_version=[r for t in done.values() for r in t[1]])
            write_report(report, out, s["name"])
    return section


# ---- the report: the sections in turn, each caught on its own, rewritten after each ------------------------------
def tests(device, left):
    """test_all.py's test_check_* of the device for at most `left` seconds -> the outcome of each that finished."""
    try:
        text, stopped = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_all.py",
                                        "-k", f"test_check_ and device-{device}"], cwd=HERE, capture_output=True,
                                       text=True, timeout=max(1, left)).stdout, None
    except subprocess.TimeoutExpired as exc:                    # what pytest -v printed before the cap
        text, stopped = (exc.stdout or b"").decode(errors="replace"), f"capped at {left:.0f} s"
    cases = [dict(test=m[1], outcome=m[2].lower()) for m in re.finditer(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", text)]
    if not cases and not stopped:
        raise RuntimeError(f"pytest ran no test: {text.strip()[-800:]}")
    failed = any(c["outcome"] in ("failed", "error") for c in cases)
    return dict(cases=cases, stopped=stopped, output=text.strip()[-1500:] if failed else None)


def settings(device, quick, name="gpu-check", **options):
    """What a report measures, per section and device (the paper's inputs, or tiny ones), `options` overriding it;
    gpu-check on a GPU also times HyperFusion's compiled step at fp32: whether --compile pays there."""
    cuda = device == "cuda"
    bf16 = ["bf16"] if cuda and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) else []
    s = dict(cases=[("ad", (16, 24, 16), 4), ("brain-age", (36, 40, 36), 2)] if quick else
             [("ad", (64, 96, 64), 32 if cuda else 4), ("brain-age", (90, 120, 99), 64 if cuda else 2)],
             precisions=dict(ratios=["fp32"], precision=["bf16"]).get(name, bf16 + ["fp16"] if cuda else ["fp32"]),
             steps=2 if quick else 10, warmup=1 if quick else 3, reference_size=512 if quick else 2048,
             threads=1 if quick and not cuda else None,                  # a small loaded CPU: threads contend
             versions=list(range(8 if name == "precision" else 2 if quick else 4)), epochs=3 if quick else None,
             tasks=("ad", "brain-age"), jobs=2, data_dir="data", tests_budget=150,
             compile=["fp32"] if cuda and name == "gpu-check" else [],
             name={"gpu-check": "check"}.get(name, name))
    return dict(s, **{k: v for k, v in options.items() if v is not None})


def run_report(sections, device, quick, out, budget_s=1e6, **options):
    """Each section in turn, caught on its own, skipped past the budget; the report rewritten after each."""
    s, end = settings(device, quick, **options), time.monotonic() + budget_s
    budget = lambda: end - time.monotonic()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    report = dict(environment=dict(
        machine=f"{cpu}, {cores()} cores, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True).stdout.strip(), torch=torch.__version__, cuda=torch.version.cuda,
        device=device, command=" ".join(["python", "bench.py"] + sys.argv[1:])), sections={})
    run = dict(tests=(60, lambda: tests(device, min(budget() - 60, s["tests_budget"]))),
               precision=(120, lambda: precision(s, device, budget, out, report)),
               hyperlayers=(10, lambda: hyperlayers(quick, device)),
               throughput=(30, lambda: throughput(s, device, budget)),
               loader=(20, lambda: loader(s, device, report["sections"].get("throughput", {}).get("rows", []))))
    for name in sections:
        need, fn, t = *run[name], time.monotonic()
        if budget() < need:
            result = dict(status="skipped", reason=f"budget: {budget():.0f} s left, {need} s needed")
        else:
            try:
                result = dict(fn(), status="ok")
            except Exception as e:     # reported with what the section kept so far; the other sections still run
                result = dict(report["sections"].get(name, {}), status="failed", error=f"{type(e).__name__}: {e}"[:800],
                              traceback=traceback.format_exc()[-1500:])
        report["sections"][name] = dict(result, seconds=time.monotonic() - t)
        write_report(report, out, s["name"])
    return report


def render(report):
    """The report as markdown: environment, then each section's status, lines and tables."""
    lines = ["# bench.py", "", ", ".join(f"{k} {v}" for k, v in report["environment"].items())]
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}: {sec['status']} ({sec['seconds']:.0f} s)"]
        lines += [str(sec[k]) for k in ("reason", "error", "stopped", "output") if sec.get(k)]
        lines += [", ".join(f"{o} {n}" for o, n in Counter(c["outcome"] for c in sec["cases"]).items())] \
            if "cases" in sec else []
        lines += [f"- the paper's protocols at {p}, one run at a time here (training passes only): " + ", ".join(
            f"{t} {h:,.0f} h ({h / 24:,.1f} days)" for t, h in v.items()) for p, v in sec.get("hours", {}).items()]
        lines += ["- float32 reference here, GFLOP/s (of_* below: a step's GFLOP/s over them): " + ", ".join(
            f"{k} {v:,.1f}" for k, v in sec["reference_gflop_s"].items())] if "reference_gflop_s" in sec else []
        for rows in filter(None, [sec.get(k) for k in ("cases", "rows", "ratios", "per_version")]):
            keys = list(dict.fromkeys(k for r in rows for k in r))
            cell = lambda v: f"{v:,.3g}" if isinstance(v, float) else " ".join(str("-" if v is None else v).split())
            lines += ["", markdown_table(keys, [[cell(r.get(k)) for k in keys] for r in rows])]
    return "\n".join(lines) + "\n"


def write_report(report, out, name):
    os.makedirs(out, exist_ok=True)
    data.write_json(report, os.path.join(out, name + ".json"))
    data.write_text(render(report), os.path.join(out, name + ".md"))


def version_range(text):
    """--versions 0-7 or 3 -> [0, ..., 7] or [3]; 3-1 (no version) is refused, not measured as none."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m or int(m[2] or m[1]) < int(m[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: a version or a range FIRST-LAST, e.g. 0-7")
    return list(range(int(m[1]), int(m[2] or m[1]) + 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", nargs="?", default="ratios", choices=["ratios", "precision", "gpu-check"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, two steps, short runs: a smoke run")
    p.add_argument("--out", default="bench_results", help="folder of the report (<section>.md, .json) and runs")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], help="ratios: the steps' autocast "
                   "(default fp32); precision, gpu-check: paired with fp32 (default bf16 where native, fp16 on CUDA)")
    p.add_argument("--task", nargs="+", choices=["ad", "brain-age"], help="precision: the tasks (default both)")
    p.add_argument("--versions", type=version_range, help="precision: 0-7 (its default) or 3 (gpu-check: 0-3)")
    p.add_argument("--jobs", type=int, default=2, choices=range(1, 65), metavar="K",
                   help="precision on a CPU: runs at a time (on a GPU one)")
    p.add_argument("--budget", type=float, default=600, help="gpu-check: seconds in all; a section past it skipped")
    p.add_argument("--skip", nargs="+", default=[], choices=CHECK_SECTIONS, help="gpu-check: sections left out")
    p.add_argument("--compile", action="store_true", help="ratios: HyperFusion's step compiled too (--compile)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    foreign = dict(ratios=("task", "versions", "jobs", "budget", "skip"), precision=("budget", "skip", "compile"))
    for name in foreign.get(args.section, ()):                    # never ignored unsaid: --budget 60 is no cap there
        if getattr(args, name) != p.get_default(name):
            p.error(f"--{name}: not an option of {args.section}; leave it out")
    if not args.budget > 0:                                       # nan too: every section skipped, an empty report
        p.error(f"--budget {args.budget:g}: must be above 0 seconds")
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # found after the first section, else
        p.error(f"--out {args.out}: a file, not a folder; give the folder for the report")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:                                 # a train step's measure, or the machine's reference rates
        child = json.loads(args.child)
        torch.manual_seed(0)
        torch.set_num_threads(child.pop("threads") or torch.get_num_threads())
        return print(json.dumps(reference(**child) if child.pop("reference", False) else measure(**child)))
    if device == "cuda" and not torch.cuda.is_available():   # else each section failed, the skipped tests "ok"
        p.error("--device cuda: no CUDA device is available" + " (a CPU build of torch)" * (torch.version.cuda is None))
    for x in set(args.precision or ["bf16"] * (args.section == "precision")) - {"fp32"}:   # the section's default
        if device != "cuda" and (x == "fp16" or args.section != "ratios"):
            p.error(f"--precision {x}: " + ("CUDA only" if x == "fp16" else "training refuses it on a CPU"))
    sections = dict(precision=["precision"], ratios=["hyperlayers", "throughput", "loader"]).get(
        args.section, [s for s in CHECK_SECTIONS if s not in args.skip])
    report = run_report(sections, device, args.quick, args.out, args.budget if args.section == "gpu-check" else 1e6,
                        name=args.section, precisions=args.precision, tasks=args.task, jobs=args.jobs,
                        versions=args.versions, compile=list(PRECISIONS) if args.compile else None)
    print(render(report), end="")
    sys.exit(1 if any(sec["status"] == "failed" for sec in report["sections"].values()) else 0)


if __name__ == "__main__":
    data.run_cli(main)    # Ctrl-C / SIGTERM: one line, exit 130 / 143, and run_commands ends the runs it started
