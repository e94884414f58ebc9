"""The prepared GPU check: what a CUDA machine measures of this code in a few minutes, in one report.

    python gpu_check.py --device cuda                 # about 10 minutes on one GPU (--budget 600)
    python gpu_check.py --device cpu --quick          # its dry run at tiny shapes, each section's code path

On a CUDA machine: install the torch build for your CUDA version, then `pip install -r requirements.txt`
(nibabel and scipy for the data sections), then the command above. One report, printed and written as
check.md and check.json under --out (default bench_results/), rewritten after each section; each section is
caught on its own (a failure is reported with what the section kept so far, the rest still runs) and skipped
once --budget seconds would be exceeded. The sections, the least measured first:
- tests: pytest on test_all.py's test_check_* with the device's id (hyperlayers equal the per-sample loop, a
  bfloat16 step within tolerance of float32, --images-on-device predicts what the loader predicts, --compile
  and --channels-last train as eager), capped at --tests-budget seconds, each test's outcome kept;
- precision: bench_precision.py's paired accuracy benchmark on the demo cohorts, fp32 against bf16 (or the
  --precision-recipes given: fp16 is CUDA's other candidate), version after version (--precision-versions, each
  task), the report kept after each version: the evidence that decides what --precision auto takes on this kind
  of GPU (precision.AUTO);
- compile: throughput of HyperFusion (and its backbone) under torch.compile;
- throughput: backbone and HyperFusion at Table 1's shapes and batches in float32, bfloat16 and bfloat16 +
  channels_last (samples/s, peak memory, HyperFusion / backbone);
- loader: its samples/s with the default workers, beside the model's;
- sharing: K = 1, 2, 4 processes training AD HyperFusion on one device at once (aggregate samples/s, as
  run-protocol --jobs with one GPU listed K times);
- protocols: the paper's protocols' wall time from these rates.
--quick: tiny shapes, two timed steps, K = 1, 2, torch.compile of AD HyperFusion alone, the tests without their
compile ones, two precision versions of three epochs.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from bench import (AD_PROTOCOL, BRAIN_AGE_PROTOCOL, fit_precision, loader_measure, markdown_rows, protocol_hours,
                   train_step_measure, write_report)
parse = canonical = None  # precision recipes left training.py (--precision-recipes no longer works)

try:
    import data
except ImportError as error:
    data, DATA_MISSING = None, error

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("tests", "precision", "compile", "throughput", "loader", "sharing", "protocols")   # in run_check's order
BENCH = os.path.join(HERE, "bench.py")            # its --child measures one model in a fresh process

# (precision, channels_last, compile); fit trains at fit_precision (--precision auto) unless told otherwise
MODELS = ("imaging", "hyperfusion")
QUICK_VARIANTS = [("fp32", False, False), ("bf16", True, False), ("bf16", False, True)]   # every code path
CHECK_VARIANTS = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", False, True)]


def check_settings(device, quick):
    """What --check measures: Table 1's shapes and batches (B = 32 and 64 on CUDA), or tiny ones with --quick."""
    cuda = device == "cuda"
    cases = ([("ad", (16, 24, 16), 4), ("brain-age", (36, 40, 36), 2)] if quick else
             [("ad", (64, 96, 64), 32 if cuda else 4), ("brain-age", (90, 120, 99), 64 if cuda else 2)])
    return dict(cases=cases, steps=2 if quick else 10, warmup=1 if quick else 3, ks=(1, 2) if quick else (1, 2, 4),
                duration=2.0 if quick else 10.0, variants=QUICK_VARIANTS if quick else CHECK_VARIANTS,
                threads=1 if quick and not cuda else None,     # a small loaded CPU: threads contend
                compile_cases=cases[:1] if quick else cases, compile_models=("hyperfusion",) if quick else MODELS,
                tests="test_check_ and device-" + device + (" and not compile" if quick else ""),
                precision_versions=2 if quick else 4, precision_epochs=3 if quick else None, precision_jobs=2,
                precision_recipes=("bf16",),
                data_dir="data")


def variant_name(precision, channels_last, compile):
    return precision + ("+channels_last" if channels_last else "") + ("+compile" if compile else "")


def run_child(args, timeout, spawn=True):
    """train_step_measure(**args) in a fresh process (spawn=False: in this one, for the test of the report)."""
    if not spawn:
        return train_step_measure(**args)
    out = subprocess.run([sys.executable, BENCH, "--child", json.dumps(args)],
                         capture_output=True, text=True, timeout=max(1, timeout))
    if out.returncode:
        raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip()[-600:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_tests(device, settings, left):
    """The check's tests (test_all.py, ids with device-<device>) in pytest, for at most `left` seconds -> counts and
    each test's outcome; stopped by its cap, the outcomes of the tests that finished are kept."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, HYPERFUSION_SLOW_CPU_TESTS="1")
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_all.py",
                                  "-k", settings["tests"], f"--junitxml={junit}"], cwd=HERE, env=env,
                                 capture_output=True, text=True, timeout=max(1, left))
        except subprocess.TimeoutExpired as exc:                    # what pytest -v printed before the cap
            text = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            outcome = {"PASSED": "passed", "SKIPPED": "skipped"}
            cases = [dict(test=m.group(1), outcome=outcome.get(m.group(2), "failure"), seconds=None, message="")
                     for m in re.finditer(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", text)]
            return dict(**outcome_counts(cases), cases=cases, stopped=f"capped at {left:.0f} s")
        if not os.path.exists(junit):
            raise RuntimeError(f"pytest exit {out.returncode}: {(out.stdout + out.stderr).strip()[-800:]}")
        cases = []
        for case in ET.parse(junit).iter("testcase"):
            bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            cases.append(dict(test=case.get("name"), outcome="passed" if bad is None else bad.tag,
                              seconds=float(case.get("time", 0)),
                              message="" if bad is None else (bad.get("message") or "")[:300]))
    return dict(**outcome_counts(cases), cases=cases)


def outcome_counts(cases):
    return {k: sum(c["outcome"] in v for c in cases) for k, v in
            dict(passed=("passed",), failed=("failure", "error"), skipped=("skipped",)).items()}


def check_throughput(device, settings, budget, spawn, compiled=False):
    """Samples/s and peak memory of backbone and HyperFusion per variant, the eager ones or (compiled, the
    dearest, a section of their own after the others) the torch.compile ones."""
    rows = []
    jobs = [(v, c, m) for v in settings["variants"] if v[2] == compiled
            for c in (settings["compile_cases"] if compiled else settings["cases"])
            for m in (settings["compile_models"] if compiled else MODELS)]
    for (precision, cl, comp), (task, shape, batch), name in jobs:
        row = dict(task=task, model=name, variant=variant_name(precision, cl, comp), shape="x".join(map(str, shape)),
                   batch=batch)
        need = 60 if comp else 15
        if budget() < need:
            rows.append(dict(row, skipped=f"budget: {budget():.0f} s left, {need} s needed"))
            continue
        args = dict(task=task, name=name, shape=shape, batch=batch, steps=settings["steps"], device=device,
                    precision=precision, channels_last=cl, compile=comp, warmup=settings["warmup"],
                    threads=settings["threads"])
        try:
            r = run_child(args, budget(), spawn)
            rows.append(dict(row, samples_s=batch / r["seconds"], peak_mb=r["peak_mb"]))
        except Exception as e:                                       # one failing variant leaves the others
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"[:600]))
    ratios = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        for task in dict.fromkeys(r["task"] for r in rows):
            im, hf = [next((r for r in rows if (r["task"], r["model"], r["variant"]) == (task, m, v)
                            and "samples_s" in r), None) for m in ("imaging", "hyperfusion")]
            if im and hf:
                ratios.append(dict(task=task, variant=v, time_ratio=im["samples_s"] / hf["samples_s"],
                                   memory_ratio=hf["peak_mb"] / im["peak_mb"]))
    return dict(rows=rows, ratios=ratios)


def check_loader(device, settings, model_rows):
    """The loader's samples/s with the workers training would use, beside HyperFusion's default-variant rate."""
    if data is None:
        raise RuntimeError(f"data.py cannot be imported ({DATA_MISSING}); pip install -r requirements.txt")
    default = fit_precision(device)
    rows = []
    for task, shape, batch in settings["cases"]:
        r = loader_measure(task, shape, batch, device)             # 3 batches a worker, each pass
        model = next((m["samples_s"] for m in model_rows if (m["task"], m["model"], m["variant"]) ==
                      (task, "hyperfusion", default) and "samples_s" in m), None)
        rows.append(dict(task=task, shape="x".join(map(str, shape)), batch=batch, workers=r["workers"],
                         batches=r["batches"],
                         loader_samples_s=r["samples_s"], model_samples_s=model,
                         loader_over_model=r["samples_s"] / model if model else None))
    return dict(rows=rows)


def check_sharing(device, settings, budget, spawn):
    """Aggregate training samples/s of K processes (AD HyperFusion, as fit trains) sharing one device, all
    timed over the same wall-clock window; on CPU each takes cores / K threads, as run-protocol --jobs."""
    task, shape, batch = settings["cases"][0]
    rows = []
    for k in settings["ks"] if spawn else (1,):
        if budget() < 30 + settings["duration"]:
            rows.append(dict(k=k, skipped=f"budget: {budget():.0f} s left"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            go = os.path.join(tmp, "go")
            base = dict(task=task, name="hyperfusion", shape=shape, batch=batch, steps=0, device=device, amp=True,
                        warmup=settings["warmup"], duration=settings["duration"], go=go,
                        threads=settings["threads"] or (None if device == "cuda" else
                                                        max(1, (os.cpu_count() or 1) // k)))
            if not spawn:
                open(go, "w").close()
                results = [train_step_measure(**base, ready=os.path.join(tmp, "ready"))]
            else:
                results = _run_together(base, k, tmp, budget)
        per = [batch / r["seconds"] for r in results]
        rows.append(dict(k=k, aggregate_samples_s=sum(per), per_process_samples_s=statistics.mean(per),
                         peak_mb_per_process=max(r["peak_mb"] for r in results)))
    one = next((r["aggregate_samples_s"] for r in rows if r["k"] == 1 and "aggregate_samples_s" in r), None)
    for r in rows:
        r["speedup"] = r["aggregate_samples_s"] / one if one and "aggregate_samples_s" in r else None
    return dict(task=task, shape="x".join(map(str, shape)), batch=batch, rows=rows)


def _run_together(base, k, tmp, budget):
    """K children of train_step_measure; once all have warmed up, one file starts their timed window."""
    ready = [os.path.join(tmp, f"ready{i}") for i in range(k)]
    procs = [subprocess.Popen([sys.executable, BENCH, "--child", json.dumps(dict(base, ready=r))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        while not all(os.path.exists(r) for r in ready):
            if any(p.poll() is not None for p in procs) or budget() < settings_margin(base):
                raise RuntimeError("a process ended or the budget ran out before all warmed up: " +
                                   "; ".join((p.stderr.read() or "")[-300:] for p in procs if p.poll() is not None))
            time.sleep(0.05)
        open(os.path.join(tmp, "go"), "w").close()
        outs = [p.communicate(timeout=base["duration"] + 120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"exit {p.returncode}: {stderr.strip()[-600:]}")
    return [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]


def settings_margin(base):
    """Budget left below which K processes still warming up are given up: their window and a little more."""
    return base["duration"] + 5


def check_protocols(device, rows, sharing):
    """The paper's two protocols' training wall time from the measured rates: as fit trains by default
    (fit_precision), at the fastest variant, and AD with the best K sharing the device."""
    rows = [r for r in rows if "samples_s" in r]
    out = {}
    for label, variant in [("default", fit_precision(device))] + \
            [(v, v) for v in dict.fromkeys(r["variant"] for r in rows)]:
        chosen = [r for r in rows if r["variant"] == variant]
        hours = {}
        for task, protocol in (("ad", AD_PROTOCOL), ("brain-age", BRAIN_AGE_PROTOCOL)):
            if {r["model"] for r in chosen if r["task"] == task} >= {"imaging", "hyperfusion"}:
                hours[task] = protocol_hours(chosen, task, protocol)
        out[label] = hours
    best = max((r["speedup"] for r in sharing.get("rows", []) if r.get("speedup")), default=None)
    if best and "ad" in out.get("default", {}):
        out["ad_default_best_k"] = dict(speedup=best, hours=out["default"]["ad"] / best)
    return out


def check_precision(device, settings, budget, out, report):
    """bench_precision.py on each task's demo cohort, fp32 against each of settings["precision_recipes"] (bf16; fp16
    too with --precision-recipes bf16 fp16), one version more at a time (runs already finished are reused), its
    report kept in this one after each version: a budget that runs out leaves every version finished so far. A GPU
    without native bfloat16 leaves out the bfloat16 recipes."""
    recipes = list(settings["precision_recipes"])
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        recipes = [r for r in recipes if not r.startswith("bf16")]
        if not recipes:
            return dict(tasks={}, note="this GPU has no bfloat16: --precision auto stays fp32")
    folder, tasks = os.path.join(out, "precision"), {}
    section = report["sections"].setdefault("precision", dict(status="running", tasks=tasks, seconds=0.0))
    for v in range(settings["precision_versions"]):
        for task in ("ad", "brain-age"):
            if budget() < 60:
                return dict(tasks=tasks, stopped=f"budget: {budget():.0f} s left after version {v - 1}")
            cmd = [sys.executable, os.path.join(HERE, "bench_precision.py"), "--task", task, "--versions", f"0-{v}",
                   "--recipes", "fp32", *recipes, "--jobs", str(settings["precision_jobs"]), "--out", folder,
                   "--data-dir", settings["data_dir"], *(["--epochs", str(settings["precision_epochs"])]
                                                             if settings["precision_epochs"] else [])]
            env = dict(os.environ, **({} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}))
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1, budget() - 30), env=env)
            except subprocess.TimeoutExpired:
                return dict(tasks=tasks, stopped=f"budget: {task} version {v} did not finish")
            if p.returncode:
                raise RuntimeError(f"{task} version {v}: exit {p.returncode}: {(p.stdout + p.stderr).strip()[-600:]}")
            with open(os.path.join(folder, f"report-{task}-hyperfusion.json")) as f:
                summary = json.load(f)
            tasks[task] = dict(versions=v + 1, summary={r: summary["summary"].get(r, {}) for r in recipes})
            section["tasks"] = tasks
            write_report(report, out, "check", render_report)
    return dict(tasks=tasks)


def run_check(device, quick, out, budget_s=600, spawn=True, tests_budget=150, skip=(), **overrides):
    """Every section of the check in turn, each caught on its own and skipped when the budget is spent;
    the report (check.md, check.json under out) is rewritten after each section -> the report dict."""
    settings = dict(check_settings(device, quick), **overrides)
    end = time.monotonic() + budget_s

    def budget():
        return end - time.monotonic()

    report = dict(environment=dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor()
                                   or platform.machine(), torch=torch.__version__, cuda=torch.version.cuda,
                                   python=platform.python_version(), cpus=os.cpu_count(), quick=quick,
                                   budget_s=budget_s, nibabel=data is not None),
                  sections={})
    sections = [("tests", 60, lambda: check_tests(device, settings, min(budget() - 60, tests_budget))),
                ("precision", 120, lambda: check_precision(device, settings, budget, out, report)),
                ("compile", 60, lambda: check_throughput(device, settings, budget, spawn, compiled=True)),
                ("throughput", 30, lambda: check_throughput(device, settings, budget, spawn)),
                ("loader", 20, lambda: check_loader(device, settings,
                                                    report["sections"].get("throughput", {}).get("rows", []))),
                ("sharing", 30, lambda: check_sharing(device, settings, budget, spawn)),
                ("protocols", 0, lambda: check_protocols(device, [r for s in ("throughput", "compile") for r in
                                                                  report["sections"].get(s, {}).get("rows", [])],
                                                        report["sections"].get("sharing", {})))]
    sections = [s for s in sections if s[0] not in skip]
    for name, need, fn in sections:
        t = time.monotonic()
        if budget() < need:
            result = dict(status="skipped", reason=f"budget: {budget():.0f} s left, {need} s needed")
        else:
            try:
                result = dict(status="ok", **fn())
            except Exception as e:     # reported with what the section kept so far; the other sections still run
                kept = {k: v for k, v in report["sections"].get(name, {}).items() if k not in ("status", "seconds")}
                result = dict(kept, status="failed", error=f"{type(e).__name__}: {e}"[:800],
                              traceback=traceback.format_exc()[-1500:])
        report["sections"][name] = dict(result, seconds=time.monotonic() - t)
        write_report(report, out, "check", render_report)
    return report



def render_report(report):
    """The report as markdown: environment, then each section's status and its tables."""
    env, lines = report["environment"], ["# gpu_check.py", ""]
    lines.append(", ".join(f"{k} {v}" for k, v in env.items()))
    for name, sec in report["sections"].items():
        lines += ["", f"## {name}: {sec['status']} ({sec['seconds']:.0f} s)"]
        if sec["status"] != "ok":
            lines.append(sec.get("reason") or sec.get("error", ""))
            if not sec.get("tasks"):                  # the precision section shows its versions so far, even failed
                continue
        if name == "tests":
            lines.append(f"passed {sec['passed']}, failed {sec['failed']}, skipped {sec['skipped']}")
            tables = [sec["cases"]]
        elif name == "precision":
            tables = [[dict(task=task, versions=t["versions"], recipe=r, metric=k, mean_loss=v["mean"], low=v["low"],
                            high=v["high"], time_ratio=v["time_ratio"], verdict=v["verdict"])
                       for task, t in sec.get("tasks", {}).items() for r, s in t["summary"].items()
                       for k, v in s.items()]]
            lines += [sec[k] for k in ("note", "stopped") if sec.get(k)]
        elif name == "protocols":
            lines += [f"- {label}: " + (", ".join(f"{t} {h:,.1f} h" for t, h in v.items()) if label !=
                                        "ad_default_best_k" else f"AD x{v['speedup']:.2f} -> {v['hours']:,.1f} h")
                      for label, v in sec.items() if isinstance(v, dict) and v]
            tables = []
        else:
            tables = [sec[k] for k in ("rows", "ratios") if k in sec]
        for rows in filter(None, tables):
            lines += [""] + markdown_rows(rows)
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny shapes: the dry run of every section's code path")
    p.add_argument("--out", default="bench_results", help="folder of check.md and check.json")
    p.add_argument("--budget", type=float, default=600, help="seconds in all; sections past it are skipped")
    p.add_argument("--tests-budget", type=float, default=150, help="seconds for the tests section at most")
    p.add_argument("--precision-versions", type=int, help="versions per task in the precision section "
                   "(default 4, --quick 2)")
    p.add_argument("--precision-recipes", nargs="+", default=["bf16"], help="what the precision section pairs with "
                   "fp32 (default bf16; add fp16 on CUDA, at the cost of versions in the budget)")
    p.add_argument("--data-dir", default="data", help="where the precision section's demo cohorts are (generated "
                   "on first use, as the training scripts do)")
    p.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections to leave out")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    for r in args.precision_recipes:
        try:
            base, _ = parse(r)
        except ValueError as exc:
            p.error(f"--precision-recipes {r}: {exc}")
        if base == "fp32":
            p.error(f"--precision-recipes {r}: fp32 is the reference every recipe is paired with")
        if base == "fp16" and device != "cuda":
            p.error(f"--precision-recipes {r}: fp16 runs on CUDA only")
    overrides = dict(data_dir=args.data_dir, precision_recipes=tuple(canonical(r) for r in args.precision_recipes),
                     **({"precision_versions": args.precision_versions} if args.precision_versions else {}))
    report = run_check(device, args.quick, args.out, args.budget, tests_budget=args.tests_budget, skip=args.skip,
                       **overrides)
    print(render_report(report), end="")


if __name__ == "__main__":
    main()
