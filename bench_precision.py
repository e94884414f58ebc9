"""The paired accuracy benchmark of precision recipes: is a faster arithmetic as accurate as float32?

    python bench_precision.py --task ad --versions 0-7 --recipes fp32 bf16
    python bench_precision.py --task brain-age --versions 0-7 --recipes fp32 bf16
    python bench_precision.py --task ad --versions 0-3 --recipes fp32 bf16 bf16+fp32:hyper bf16+fp32:bn   # ablation
    python bench_precision.py --task ad --per-step --recipes bf16 bf16+fp32:hyper ...   # where the error arises

For one task it trains the demo's runs (the training scripts as a user runs them, on the built-in
synthetic cohort unless --data-csv says otherwise) once per recipe (precision.py) with the same
versions, split and data, K runs at a time (--jobs; one version's recipes side by side, each with
cores / K threads). Then, per recipe against float32, version by version, the paired loss of accuracy:
AD test balanced accuracy (Eq. 9) and macro AUC, fp32 minus the recipe; brain age test MAE, the recipe
minus fp32, in years. It prints the mean loss, its 95% confidence interval (Student t over the
versions), the one-sided 95% upper bound, and the training-time ratio (the runs' epochs as log.csv
timed them, the tabular MLP included for AD HyperFusion), with the command line, commit and machine.

A recipe is non-inferior when at least 8 versions put the upper end of the 95% interval of its loss below
the margin: 0.02 BA for AD, 0.15 years for brain age (MARGINS). Only such a recipe may become what
`--precision auto` takes on that kind of device (training.AUTO). Finished runs are kept and reused:
running it again with more versions or recipes trains only what is missing, and a run it was stopped in
continues from its last epoch (--resume: on a CPU it ends exactly as an uninterrupted run). A benchmark, not a test.

--per-step trains nothing: it replays the first version's finished float32 run, with its trained weights,
on batches of its own test set, once per recipe, and measures how far each recipe's arithmetic lands from
float32's on the same weights and batches: the training-mode outputs, loss and gradient (what a step
follows), the evaluation outputs (what a score reads), the precise-BN statistics (brain age), and the time of
a training step. Keeping one part in float32 at a time (bf16+fp32:PART) shows which part's rounding the
error comes from, at the cost of seconds instead of a whole paired benchmark.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

import data
import training
from evaluate import Job, run_jobs
from predict import test_set
from training import load_run
from data import ArgumentParser, UserError, run_cli, write_json, write_text
from synthetic import builtin_cohort
from training import ad_run_dir, brain_age_run_dir
from training import load_weights, make_loader, recalibrate_batchnorm

HERE = os.path.dirname(os.path.abspath(__file__))
MARGINS = {"ad": 0.02, "brain-age": 0.15}        # the largest loss of accuracy that counts as none (issue text)
MIN_VERSIONS = 8
METRICS = {"ad": [("balanced_accuracy", "BA", 1.0), ("auc_macro", "AUC", 1.0)],   # (key, name, +1: higher is better)
           "brain-age": [("mae", "MAE", -1.0)]}


def parse_versions(text):
    """"0-7" or "0,2,5" or "3" -> [0, ..., 7]; one error naming the option otherwise."""
    try:
        out = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--versions {text}: give versions as 0-7 or 0,1,2") from None
    if not out or min(out) < 0:
        raise UserError(f"--versions {text}: give versions as 0-7 or 0,1,2 (none below 0)")
    return sorted(set(out))


def slug(recipe):
    """A folder name for a recipe: bf16+fp32:hyper,bn -> bf16-fp32-hyper-bn."""
    return recipe.replace("+", "-").replace(":", "-").replace(",", "-")


def run_dir(args, recipe, version):
    out = os.path.join(args.out, slug(recipe))
    if args.task == "ad":
        return ad_run_dir(out, args.model, args.split_seed, version, args.fold)
    return brain_age_run_dir(out, args.model, version)


def command(args, recipe, version):
    """The training command of one (recipe, version): the demo command a user types, with --version and --precision."""
    script = "train_ad.py" if args.task == "ad" else "train_brain_age.py"
    cmd = [sys.executable, os.path.join(HERE, script), "--model", args.model, "--version", str(version),
           "--precision", recipe, "--out", os.path.join(args.out, slug(recipe)), "--data-dir", args.data_dir, "--quiet",
           "--resume"]                               # a run the benchmark was stopped in continues where it was
    if args.task == "ad":
        cmd += ["--split-seed", str(args.split_seed), "--fold", str(args.fold)]
    if args.data_csv:
        cmd += ["--data-csv", args.data_csv] + (["--image-dir", args.image_dir] if args.image_dir else [])
    return cmd + (["--epochs", str(args.epochs)] if args.epochs else [])


def log_column(folder, name):
    """One column of a run's log.csv (training.fit: a row per epoch), as floats."""
    with open(os.path.join(folder, "log.csv")) as fh:
        rows = [r.split(",") for r in fh.read().splitlines()]
    col = rows[0].index(name)
    return [float(r[col]) for r in rows[1:]]


def training_seconds(folder, args):
    """Seconds the run's epochs took, with the tabular MLP's that AD HyperFusion trained first."""
    folders = [folder]
    if args.task == "ad" and args.model == "hyperfusion":
        folders.append(folder.replace(os.sep + "hyperfusion" + os.sep, os.sep + "tabular" + os.sep))
    return sum(sum(log_column(f, "seconds")) for f in folders)


def last_epochs_spread(folder, task, n=4):
    """max - min of the validation score (brain age MAE, AD BA) over the last n epochs: how settled a run ends."""
    values = log_column(folder, "mae" if task == "brain-age" else "balanced_accuracy")[-n:]
    return max(values) - min(values)


def read_results(args, recipes, versions):
    """{recipe: {version: {"metrics": {key: test value}, "seconds": s, "spread": s}}} of the finished runs."""
    results = {}
    for recipe in recipes:
        for v in versions:
            folder = run_dir(args, recipe, v)
            with open(os.path.join(folder, "metrics.json")) as fh:
                test = json.load(fh)["test"]
            results.setdefault(recipe, {})[v] = {
                "metrics": {k: float(test[k]) for k, _, _ in METRICS[args.task]},
                "seconds": training_seconds(folder, args), "spread": last_epochs_spread(folder, args.task)}
    return results


def paired_loss(reference, other, sign):
    """The loss of accuracy per version (reference minus other where higher is better, sign +1; other minus
    reference where lower is better, sign -1) and its summary: mean, 95% t interval, one-sided 95% bound."""
    d = sign * (np.asarray(reference) - np.asarray(other))
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "losses": d.tolist(), "mean": mean, "low": float("nan"), "high": float("nan"),
                "one_sided": float("nan"), "width": float("nan")}
    se = float(d.std(ddof=1) / np.sqrt(n))
    t2, t1 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.95, n - 1)
    return {"n": n, "losses": d.tolist(), "mean": mean, "low": mean - t2 * se, "high": mean + t2 * se,
            "one_sided": mean + t1 * se, "width": 2 * t2 * se}


def verdict(summary, margin):
    """non-inferior (the 95% interval's upper end below the margin, over >= MIN_VERSIONS versions), or why not."""
    if summary["n"] < MIN_VERSIONS:
        return f"not shown ({summary['n']} versions, {MIN_VERSIONS} needed)"
    if summary["high"] < margin:
        return f"non-inferior (upper bound {summary['high']:.3f} < {margin})"
    return f"not shown (upper bound {summary['high']:.3f} >= {margin})"


def report(args, recipes, versions, results, argv):
    """The markdown report and its JSON: per version, then per recipe against fp32."""
    keys = METRICS[args.task]
    lines = [f"# Paired precision benchmark: {args.task}, {args.model}" + (
        f", split seed {args.split_seed}, fold {args.fold}" if args.task == "ad" else ""), "",
        f"command: `python bench_precision.py {' '.join(argv)}`  ", f"commit: {commit()}  ",
        f"machine: {machine()}", "",
        "## Per version (test set)", "",
        "| version | " + " | ".join(f"{r} {name}" for r in recipes for _, name, _ in keys) + " | " +
        " | ".join(f"{r} s" for r in recipes) + " |", "|---" * (1 + len(recipes) * (len(keys) + 1)) + "|"]
    for v in versions:
        lines.append(f"| {v} | " + " | ".join(f"{results[r][v]['metrics'][k]:.3f}" for r in recipes for k, _, _ in keys)
                     + " | " + " | ".join(f"{results[r][v]['seconds']:.0f}" for r in recipes) + " |")
    margin, summary = MARGINS[args.task], {}
    lines += ["", f"## Loss of accuracy against fp32 (positive: worse than fp32; margin {margin})", "",
              "| recipe | metric | mean loss | 95% interval | width | one-sided 95% bound | time ratio fp32 / recipe |"
              " verdict |", "|---|---|---|---|---|---|---|---|"]
    fp32_time = sum(results["fp32"][v]["seconds"] for v in versions)
    for r in recipes:
        if r == "fp32":
            continue
        ratio = fp32_time / sum(results[r][v]["seconds"] for v in versions)
        for k, name, sign in keys:
            s = paired_loss([results["fp32"][v]["metrics"][k] for v in versions],
                            [results[r][v]["metrics"][k] for v in versions], sign)
            s["time_ratio"] = ratio
            s["verdict"] = verdict(s, margin) if k == keys[0][0] else "(secondary)"
            summary.setdefault(r, {})[k] = s
            lines.append(f"| {r} | {name} | {s['mean']:+.4f} | [{s['low']:+.4f}, {s['high']:+.4f}] | {s['width']:.4f} "
                         f"| {s['one_sided']:+.4f} | {ratio:.2f}x | {s['verdict']} |")
    spread_name = "validation MAE" if args.task == "brain-age" else "validation BA"
    lines += ["", f"## How settled the runs end: max - min of the {spread_name} over the last four epochs", "",
              "| recipe | " + " | ".join(f"v{v}" for v in versions) + " | largest |",
              "|---" * (len(versions) + 2) + "|"]
    for r in recipes:
        spreads = [results[r][v]["spread"] for v in versions]
        lines.append(f"| {r} | " + " | ".join(f"{s:.2f}" for s in spreads) + f" | {max(spreads):.2f} |")
    return "\n".join(lines) + "\n", {"task": args.task, "model": args.model, "versions": versions, "recipes": recipes,
                                      "command": argv, "commit": commit(), "machine": machine(), "margin": margin,
                                      "runs": {r: {str(v): x for v, x in results[r].items()} for r in recipes},
                                      "summary": summary}


# ----------------------------------------------------------------------------------------------
# --per-step: where the arithmetic departs from float32, on one trained run's weights

def step_batches(finished, n_batches, seed=0):
    """Up to n_batches training-sized batches of the run's test subjects (one hippocampus drawn per AD sample, as
    in training; brain-age targets encoded as the run's network regresses them)."""
    run, table, test_idx, images = test_set(finished)
    if run.task == "ad":
        tab = finished.tabular.transform([table.raw[i] for i in test_idx])
        ds = data.ADDataset(images, tab, table.labels[test_idx], train=True)
    else:
        ds = data.BrainAgeDataset(images, data.sex_onehot(table.sex[test_idx]),
                                  finished.target.encode(table.age[test_idx]))
    torch.manual_seed(seed)
    loader = make_loader(ds, run.batch_size, 0, torch.device("cpu"), shuffle=True)
    return [(image.float(), tab, target) for _, (image, tab, target) in zip(range(n_batches), loader)]


def step_outputs(finished, recipe, batches):
    """The run's trained network at `recipe` on each batch: training-mode outputs, loss and gradient, evaluation
    outputs, the precise-BN running statistics re-estimated over the batches, and the median seconds of a step."""
    cpu = torch.device("cpu")
    model = finished.run.replace(precision=recipe).build_model(finished.inputs)
    load_weights(model, finished.checkpoint["model"], finished.checkpoint_path)
    for m in model.modules():                       # the same computation for every recipe: no dropout draws
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)):
            m.p = 0.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = F.cross_entropy if finished.run.task == "ad" else F.mse_loss
    out = {"train": [], "loss": [], "grad": [], "eval": [], "seconds": []}
    for image, tabular, target in [batches[0]] + batches:          # the first once more, untimed, to warm up
        model.load_state_dict(state)                               # train mode moves the running statistics
        model.train().zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with training.autocast(cpu, recipe):
            y = model(image, tabular)
        with training.autocast(cpu, recipe, "loss"):
            loss = loss_fn(y.float() if training.keeps(recipe, "loss") else y, target)
        loss.backward()
        out["seconds"].append(time.perf_counter() - t0)
        out["train"].append(y.detach().float())
        out["loss"].append(float(loss.detach()))
        out["grad"].append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        with torch.no_grad(), training.autocast(cpu, recipe, "eval"):
            out["eval"].append(model.eval()(image, tabular).float())
    for k in ("train", "loss", "grad", "eval"):
        out[k] = out[k][1:]
    out["seconds"] = float(np.median(out["seconds"][1:]))
    model.load_state_dict(state)
    recalibrate_batchnorm(model, batches, cpu, recipe)
    out["bn"] = torch.cat([b.flatten() for k, b in model.state_dict().items() if k.endswith(("running_mean",
                                                                                            "running_var"))])
    return out


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def per_step(args, recipes, versions, argv):
    """The --per-step report: each recipe against float32 on the same trained weights and batches."""
    folder = run_dir(args, "fp32", versions[0])
    if not os.path.isfile(os.path.join(folder, "metrics.json")):
        raise UserError(f"--per-step: {folder} is not finished; train it first (the same command without --per-step)")
    finished = load_run(folder)
    batches = step_batches(finished, args.batches)
    ref = step_outputs(finished, "fp32", batches)
    ad = args.task == "ad"
    head = ("max abs. probability change (eval)" if ad else "mean abs. age change, years (eval)")
    lines = [f"# Per-step precision ablation: {args.task}, {args.model}, the trained fp32 run {folder}", "",
             f"command: `python bench_precision.py {' '.join(argv)}`  ", f"commit: {commit()}  ",
             f"machine: {machine()}  ", f"{len(batches)} batches of {finished.run.batch_size} test subjects, "
             f"dropout off; errors relative to fp32 on the same weights and batches (0 = float32's result)", "",
             f"| recipe | outputs (train) | loss | gradient | 1 - gradient cosine | {head} | "
             f"{'predicted class changed' if ad else 'precise-BN statistics'} | step time fp32 / recipe |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in recipes:
        o = ref if r == "fp32" else step_outputs(finished, r, batches)
        grad = [relative(g, g32) for g, g32 in zip(o["grad"], ref["grad"])]
        cos = [1 - float(F.cosine_similarity(g.double(), g32.double(), dim=0))
               for g, g32 in zip(o["grad"], ref["grad"])]
        outs = float(np.mean([relative(y, y32) for y, y32 in zip(o["train"], ref["train"])]))
        loss = float(np.mean([abs(a - b) / abs(b) for a, b in zip(o["loss"], ref["loss"])]))
        if ad:
            p, p32 = (torch.cat([torch.softmax(y, 1) for y in x["eval"]]) for x in (o, ref))
            ev, last = float((p - p32).abs().max()), float((p.argmax(1) != p32.argmax(1)).float().mean())
            last_text = f"{100 * last:.1f}%"
        else:
            scale = finished.target.scale
            ev = float(np.mean([float((y - y32).abs().mean()) * scale for y, y32 in zip(o["eval"], ref["eval"])]))
            last = relative(o["bn"], ref["bn"])
            last_text = f"{last:.2e}"
        row = {"recipe": r, "outputs": outs, "loss": loss, "gradient": float(np.mean(grad)),
               "one_minus_cosine": float(np.mean(cos)), "eval": ev, "last": last,
               "speed": ref["seconds"] / o["seconds"]}
        rows.append(row)
        lines.append(f"| {r} | {outs:.2e} | {loss:.2e} | {row['gradient']:.2e} | {row['one_minus_cosine']:.2e} | "
                     f"{ev:.2e} | {last_text} | {row['speed']:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n", {"task": args.task, "model": args.model, "run": folder, "command": argv,
                                      "commit": commit(), "machine": machine(), "rows": rows}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["ad", "brain-age"], required=True)
    p.add_argument("--model", default="hyperfusion")
    p.add_argument("--versions", default="0-7", help="initialisation seeds, 0-7 or 0,1,2 (default 0-7)")
    p.add_argument("--recipes", nargs="+", default=["fp32", "bf16"],
                   help="precision recipes (precision.py); fp32, the reference, is added when missing")
    p.add_argument("--split-seed", type=int, default=0, help="AD (the demo command's)")
    p.add_argument("--fold", type=int, default=2, help="AD (the demo command's)")
    p.add_argument("--epochs", type=int, help="default: the scripts' own (the demo schedule on the demo cohort)")
    p.add_argument("--data-csv", help="default: the built-in synthetic cohort")
    p.add_argument("--image-dir")
    p.add_argument("--data-dir", default="data", help="where the built-in cohort lives")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cores / jobs threads")
    p.add_argument("--out", default="bench_results/precision")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    p.add_argument("--per-step", action="store_true",
                   help="train nothing: each recipe's arithmetic against float32 on the first version's trained "
                        "fp32 run (see above)")
    p.add_argument("--batches", type=int, default=8, help="--per-step: batches of test subjects")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: at least 1")
    recipes = []
    for r in ["fp32"] + args.recipes:
        try:
            r = training.canonical(r)
        except ValueError as exc:
            raise UserError(f"--recipes {r}: {exc}") from None
        if r not in recipes:
            recipes.append(r)
    return args, recipes, parse_versions(args.versions)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, recipes, versions = parse_args(argv)
    if args.per_step:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
        return write_report(args, "per-step", *per_step(args, recipes, versions, argv))
    jobs = [Job(run_dir(args, r, v), command(args, r, v), kind=r, label=f"{r} v{v}")
            for v in versions for r in recipes if not os.path.isfile(os.path.join(run_dir(args, r, v), "metrics.json"))]
    if args.report_only:
        missing = [j.label for j in jobs]
        if missing:
            raise UserError(f"--report-only: {len(missing)} runs are not finished ({', '.join(missing[:4])} ...)")
    elif jobs:
        if not args.data_csv:                     # generated once here, not by two runs at a time
            builtin_cohort(args.task, args.data_dir)
        print(f"{len(jobs)} runs to train, {args.jobs} at a time", flush=True)
        run_jobs(jobs, args.jobs)
    write_report(args, "report", *report(args, recipes, versions, read_results(args, recipes, versions), argv))


def write_report(args, kind, text, summary):
    """<out>/<kind>-<task>-<model>.md and .json, and the markdown printed."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{kind}-{args.task}-{args.model}")
    write_text(text, stem + ".md")
    write_json(summary, stem + ".json")
    print(text, end="")


if __name__ == "__main__":
    run_cli(main)
