"""The protocol runner (Sec. 4.2.2, 4.3.6): train every run of a task's protocol that is missing, then its table.

    python protocol.py --task ad --split-seeds 0 1 2 --versions 0 1 2          # Table 3's runs, then Table 3
    python protocol.py --task brain-age --versions 0 1 2 3 4 5 6               # Sec. 4.2.2's versions, then Fig. 4
    python protocol.py --task ad --split-seeds 0 1 2 --versions 0 1 2 --jobs 4 --gpus 0,1,2,3   # 4 runs at a time
    python protocol.py --task ad --split-seeds 0 1 2 --versions 0 1 2 --print-commands > runs.txt  # a job array

Finished runs (a metrics.json) are skipped, interrupted ones resume from last.pt, and finished runs of
other data are refused before anything trains (check_protocol_data). --jobs K runs K trainings at a time,
each its training script in a process of its own (launcher.py), one GPU each with --gpus; HyperFusion
waits for the tabular-only MLP its embedding starts from. The table at the end is evaluate.py's.
`python evaluate.py run-protocol ...` is the same command with the same options.
"""
import argparse
import json
import os
import shlex
import sys
import time

import torch

import data
import evaluate
import launcher
import train_ad
import train_brain_age
from models import AD_MODELS, BRAIN_AGE_MODELS
from runs import finished, load_run
from safeio import ArgumentParser, Progress, UserError, check_number, duration_text, run_cli, warn
from synthetic import builtin_cohort
from runconfig import ad_run_dir, brain_age_run_dir


def check_protocol_data(finished_dirs, task, data_csv=None, image_dir=None, data_dir="data", must=True, cache_dir=None):
    """The finished runs a protocol skips were trained on the table and the images it would train the others on:
    the table's sha256 and the images' fingerprint held in their checkpoints, compared with those of the data now.
    A difference is refused before anything trains (must: some runs are still to train, which would mix two
    versions of the data in one result), else warned (the results are then all of the data the runs had)."""
    csv_path, now, fingerprints = None, None, {}
    for d in finished_dirs:
        r = load_run(d)
        held, problem = r.inputs.get("table_sha256"), None
        if not held:            # a run of a version of this code that did not tie runs to their data
            continue
        if now is None:
            csv_path = data_csv or builtin_cohort(task, data_dir)
            now = data.table_sha256(csv_path)
        if held != now:
            problem = (f"{d} was trained on another version of {csv_path} (table sha256 {held[:12]}..., now "
                       f"{now[:12]}...: edited since?)")
        elif r.inputs.get("images_sha256"):
            key = (r.run.classes, json.dumps(r.run.group_map, sort_keys=True))   # the rows, so the images, it read
            if key not in fingerprints:
                table = (data.read_ad_table(csv_path, image_dir, classes=r.run.classes, group_map=r.run.group_map)
                         if task == "ad" else data.read_brain_age_table(csv_path, image_dir))
                fingerprints[key] = data.image_fingerprint(table.image_paths, data.cache_folder(cache_dir, csv_path),
                                                           table.subjects)
            if fingerprints[key] != r.inputs["images_sha256"]:
                problem = (f"{d} was trained on other images than {csv_path} names now (images_sha256 "
                           f"{r.inputs['images_sha256'][:12]}..., now {fingerprints[key][:12]}...: replaced or "
                           f"re-preprocessed since?)")
        if problem and must:
            raise UserError(problem + "; training the missing runs would mix two versions of the data in one result: "
                            "restore the data, or train them all again into another --runs folder")
        if problem:
            warn(problem + "; every run is finished, so the results are all of the data they were trained on")


def run_protocol(task, runs="runs", split_seeds=(0,), versions=None, models=None, epochs=None, data_csv=None,
                 image_dir=None, data_dir="data", binary=False, train_sex=("all",), embedding_dim=1, verbose=False,
                 tabular_epochs=None, jobs=1, gpus=None, print_commands=False, quiet=False, cache_dir=None):
    """Train every run of the protocol that has no metrics.json yet (an interrupted one resumes from
    last.pt), skip the finished ones, then build the task's table. -> (trained, skipped, results).

    jobs > 1: that many runs at a time, each its training script in its own process (launcher.py),
    with `gpus` one GPU each; HyperFusion waits for the tabular-only run of its split seed, version
    and fold when that run is part of the protocol (its embedding starts from it, Sec. 4.3.6).

    print_commands: train nothing; print one shell command per missing run instead (with --resume where
    a last.pt exists), every tabular-only run before any HyperFusion run, for a scheduler (a SLURM job
    array, GNU parallel). -> (commands, skipped, None). After each run, `run k of N done (...); about ... left`
    (Progress.item_done, per model); quiet: no line but the table's."""
    t0 = time.time()
    common = ["--out", runs, "--data-dir", data_dir] \
        + (["--data-csv", data_csv] if data_csv else []) + (["--image-dir", image_dir] if image_dir else []) \
        + (["--cache-dir", cache_dir] if cache_dir else []) \
        + ([] if verbose else ["--quiet"])
    schedule = lambda model: ["--epochs", str(tabular_epochs if model == "tabular" and tabular_epochs else epochs)] \
        if (epochs or (model == "tabular" and tabular_epochs)) else []
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give 1 or more runs at a time")
    n_jobs, jobs = jobs, []  # (run dir, parser, train function, argv, script, run dir to wait for)
    if task == "ad":
        for model in models or AD_MODELS:
            if model not in AD_MODELS:
                raise UserError(f"--models {model}: not an AD model (one of {', '.join(AD_MODELS)})")
            for s in split_seeds:
                for v in versions if versions is not None else (0,):
                    for f in range(evaluate.N_FOLDS):
                        argv = ["--model", model, "--split-seed", str(s), "--version", str(v), "--fold", str(f)] \
                            + (["--classes", "2"] if binary else []) + schedule(model) + common
                        after = ad_run_dir(runs, "tabular", s, v, f, binary) if model == "hyperfusion" else None
                        jobs.append((ad_run_dir(runs, model, s, v, f, binary), train_ad.ad_arguments,
                                     lambda a: train_ad.train_ad(a), argv, train_ad.__file__, after))
    elif task == "brain-age":
        if len(split_seeds) != 1:
            raise UserError("brain-age runs are not kept per split seed (runs/brain-age/<model>/v<V>): give one "
                            "--split-seeds value")
        for model in models or BRAIN_AGE_MODELS:
            if model not in BRAIN_AGE_MODELS:
                raise UserError(f"--models {model}: not a brain-age model (one of {', '.join(BRAIN_AGE_MODELS)})")
            for sex in train_sex:
                for v in versions if versions is not None else range(5):
                    argv = ["--model", model, "--version", str(v), "--split-seed", str(split_seeds[0]),
                            "--embedding-dim", str(embedding_dim), "--train-sex", sex] + schedule(model) + common
                    run_dir = brain_age_run_dir(runs, model, v, embedding_dim, sex)
                    jobs.append((run_dir, train_brain_age.brain_age_arguments,
                                 lambda a: train_brain_age.train_brain_age(a), argv, train_brain_age.__file__, None))
    else:
        raise UserError(f"unknown task {task!r}: expected ad or brain-age")
    trained, skipped, todo = [], [], []
    done = [job[0] for job in jobs if finished(job[0])]
    if done:   # before anything trains: the finished runs must be of the data the others would train on
        check_protocol_data(done, task, data_csv, image_dir, data_dir, len(done) < len(jobs), cache_dir)
    if print_commands:    # the tabular-only MLPs first: HyperFusion's embedding starts from them (Sec. 4.3.6)
        jobs.sort(key=lambda j: j[4] != train_ad.__file__ or "--model tabular" not in " ".join(j[3]))
    shown = Progress("train", None, "runs", quiet or print_commands,     # kinds: the models, each its own pace
                     kinds=[argv[1] for run_dir, _, _, argv, _, _ in jobs if not finished(run_dir)])
    label = lambda run_dir: " ".join(os.path.relpath(run_dir, runs).split(os.sep))     # ad hyperfusion seed0 v0 fold2
    for k, (run_dir, parser, train, argv, script, after) in enumerate(jobs):
        if finished(run_dir):
            skipped.append(run_dir)
            shown.say(f"[{k + 1}/{len(jobs)}] skipped (finished): {run_dir}")
            continue
        resume = os.path.isfile(os.path.join(run_dir, "last.pt"))
        argv = argv + (["--resume"] if resume else [])
        if print_commands:
            trained.append(shlex.join(["python", os.path.basename(script)] + argv))
            print(trained[-1], flush=True)
            continue
        if n_jobs > 1 or gpus:    # --gpus with --jobs 1: one run at a time, each in a process on its GPU
            todo.append(launcher.Job(run_dir, [sys.executable, script] + argv, after, argv[1], label(run_dir)))
            continue
        shown.say(f"[{k + 1}/{len(jobs)}] {'resuming' if resume else 'training'}: {run_dir}")
        with shown.hushed():
            t1 = time.time()
            train(vars(parser().parse_args(argv)))
        trained.append(run_dir)
        shown.item_done(argv[1], time.time() - t1, label(run_dir))
    if print_commands:
        return trained, skipped, None
    if todo:
        masks = launcher.gpu_masks(gpus, torch.cuda.device_count()) if gpus else None
        trained = launcher.run_jobs(todo, n_jobs, masks, quiet=quiet)
    shown.say(f"protocol: {len(trained)} trained, {len(skipped)} skipped, {duration_text(time.time() - t0)}")
    res = evaluate.evaluate_ad(runs, binary) if task == "ad" else evaluate.evaluate_brain_age(runs)
    shown.say(f"total wall time {duration_text(time.time() - t0)}")
    return trained, skipped, res


def arguments():
    r = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--task", required=True, choices=["ad", "brain-age"])
    r.add_argument("--split-seeds", type=int, nargs="+", default=[0])
    r.add_argument("--versions", type=int, nargs="+", help="default: 0 (AD), 0 1 2 3 4 (brain age)")
    r.add_argument("--models", nargs="+", help="default: every model of the task")
    r.add_argument("--epochs", type=int, help="default: the training scripts' (Table 1, or the demo schedule)")
    r.add_argument("--tabular-epochs", type=int, help="AD: epochs of the tabular-only MLP (cheap; default --epochs)")
    r.add_argument("--binary", action="store_true", help="AD: CN vs AD (App. B)")
    r.add_argument("--train-sex", nargs="+", default=["all"], choices=["all", "M", "F", "mixed"],
                   help="brain age: training sets (Fig. 4A: M F mixed)")
    r.add_argument("--embedding-dim", type=int, default=1, choices=[1, 2], help="brain age: sex embedding size")
    r.add_argument("--verbose", action="store_true", help="the training scripts' per-epoch lines (--jobs 1)")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process (1: in this one)")
    r.add_argument("--gpus", type=lambda v: [int(g) for g in v.split(",") if g != ""],
                   help="with --jobs: GPU indices shared out to the runs, one each, e.g. 0,1,2,3")
    r.add_argument("--print-commands", action="store_true",
                   help="train nothing: print one command per missing run (tabular-only first), for a scheduler")
    r.add_argument("--quiet", action="store_true", help="no progress lines: the table (and its files) alone")
    r.add_argument("--runs", default="runs")
    r.add_argument("--data-csv", help="default: the built-in synthetic cohort")
    r.add_argument("--image-dir")
    r.add_argument("--data-dir", default="data", help="where the synthetic cohort is generated")
    r.add_argument("--cache-dir", help="decoded-image cache (default: <csv folder>/cache; somewhere writable when the "
                   "data is on read-only storage)")
    return r


def main(argv=None):
    a = arguments().parse_args(argv)
    for option, least in (("split_seeds", 0), ("versions", 0), ("epochs", 1), ("tabular_epochs", 1)):
        check_number("--" + option.replace("_", "-"), getattr(a, option, None), least=least)
    return run_protocol(a.task, a.runs, a.split_seeds, a.versions, a.models, a.epochs, a.data_csv, a.image_dir,
                        a.data_dir, a.binary, a.train_sex, a.embedding_dim, a.verbose, a.tabular_epochs, a.jobs, a.gpus,
                        a.print_commands, a.quiet, a.cache_dir)


if __name__ == "__main__":
    run_cli(main)
