"""The built-in synthetic cohorts: brain-like MRIs and tables written in the real on-disk format (NIfTI per
subject, the CSV table, crops.json for AD), so that everything runs through data.py's real loading path without
ADNI or UK Biobank access. Deterministic for a seed; results on them are sanity checks, not clinical results.

    python synthetic.py ad --out DIR [--n N] [--seed S]
    python synthetic.py brain-age --out DIR [--n N] [--seed S]
    python synthetic.py oracle --cohort DIR [--predictions RUN/predictions.npz]   # the brain-age oracle's MAE

Images: an ellipsoidal skull-stripped brain (outer CSF, folded cortex, white matter, deep GM, two ventricles, two
hippocampi in CSF pockets), T1 intensities CSF < GM < WM, a smooth bias field and noise, z-scored over the brain.
AD: hippocampal volume = sex baseline (women smaller) x age decline x (1 - diagnosis atrophy, CN < MCI < AD,
stronger in women) x noise, so the image alone is ambiguous (an old woman's or an AD patient's?) and age and sex
disambiguate it; ventricles and outer CSF grow with age and diagnosis. The table's CSF and PET markers depend on
the diagnosis only, with large noise, censoring and ~50% missingness, APOE4 more frequent in AD: each modality
holds diagnosis information the other lacks.
Brain age: brain age = age + a gap wider in men (sd 3.5 and 3 years, Sec. 4.2.6, so that a perfect reader errs by
under 3, as Sec. 2.3 reports of the best image models). It sets a latent atrophy index, rising after 20 and
steeper after 40, 1.5x in men (the strong end of Coffey et al. 1998, ref. [10]), that each structure reads with
its own noise (ventricles, outer CSF, cortex, hippocampi); heads are ~11% smaller in women. A given atrophy means
an older woman than man, which sex conditioning can exploit. brain_age_oracle reads the latent anatomy with the
exact model: its MAE with and without sex (cohort.json, oracle.csv) bounds what any model could reach.
"""
import contextlib
import json
import math
import os
import shutil
import time
import uuid

import numpy as np
from scipy import ndimage

from data import (AD_ATTRIBUTES, CLASS_NAMES, ArgumentParser, HippocampusCrops, Progress, UserError, cache_lock,
                  check_folder, check_number, duration_text, read_brain_age_table, read_csv_rows, run_cli, save_nifti,
                  write_csv, write_json)
from metrics import fmt, markdown_table, regression_metrics

AD_SYNTH = {
    "class_fraction": {"CN": 740 / 2120, "MCI": 1015 / 2120, "AD": 365 / 2120},   # Table 2
    "age_mean_sd": {"CN": (72.2, 6.8), "MCI": (72.8, 7.6), "AD": (75.1, 7.8)},   # Table 2
    "male_fraction": {"CN": 309 / 740, "MCI": 569 / 1015, "AD": 198 / 365},       # Table 2
    "hippo_female_factor": 0.88, "hippo_age_slope": 0.012,
    "hippo_atrophy": {"CN": 0.0, "MCI": 0.12, "AD": 0.25}, "hippo_atrophy_female_gain": 1.15,
    "hippo_noise_sd": 0.05,
    "apoe4_probs": {"CN": (0.72, 0.25, 0.03), "MCI": (0.5, 0.4, 0.1), "AD": (0.33, 0.47, 0.2)},
    # attribute: (mean CN, MCI, AD), (sd CN, MCI, AD), assay range or None, decimals
    "biomarkers": {"ABETA": ((1200, 950, 650), (400, 400, 260), (200, 1700), 1),
                   "PTAU": ((21, 26, 36), (8, 12, 14), (8, 120), 2),
                   "TAU": ((230, 280, 370), (80, 110, 130), (80, 1300), 1),
                   "FDG": ((6.5, 6.2, 5.4), (0.5, 0.6, 0.7), None, 3),
                   "AV45": ((1.1, 1.2, 1.4), (0.15, 0.2, 0.2), None, 3)},
    "missing_prob": {"CSF": (0.6, 0.45, 0.45), "FDG": (0.55, 0.45, 0.4), "AV45": (0.55, 0.45, 0.45)},
    "shape": (48, 60, 48), "spacing_mm": 2.67, "crop_size": (24, 36, 24),
}
BRAIN_AGE_SYNTH = {
    "age_range": (8, 90), "age_uniform_fraction": 0.4, "age_bump": (63, 8),   # life span + a UK-Biobank-like bump
    "shape": (40, 48, 40), "spacing_mm": 4.0,
    "atrophy_linear": 0.25, "atrophy_after_40": {"M": 0.525, "F": 0.35},       # men 1.5x (Coffey et al. 1998)
    "brain_age_gap_sd": {"M": 3.5, "F": 3.0},                 # years; Sec. 4.2.6: wider in men; Sec. 2.3: < 3 MAE
    "head_scale": {"M": 1.0, "F": 0.962}, "head_scale_sd": 0.03,               # ICV: women ~11% smaller, CV ~9%
    # structure = f(a) with its own variability: log ventricle and hippocampus, CSF shell and cortex widths
    "vent_sd": 0.1, "csf_sd": 0.002, "cortex_sd": 0.002, "hippo_sd": 0.02,
}
SYNTH = {"ad": AD_SYNTH, "brain-age": BRAIN_AGE_SYNTH}
HIPPO_CENTRE = (0.36, -0.12, -0.32)  # normalised (|x|, y, z) of the hippocampi


def head_grid(shape):
    """Normalised coordinates in [-1, 1] per axis and a fixed cortical folding pattern."""
    u, v, w = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    fold = np.sin(9 * np.arctan2(v, u)) * np.sin(7 * np.arctan2(w, np.hypot(u, v)))
    return u, v, w, fold.astype(np.float32)


def _ell(u, v, w, c, r):
    return ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((w - c[2]) / r[2]) ** 2


def render_head(grid, p, rng):
    """Brain-like float32 volume from anatomy parameters p (see the model above), z-scored in the brain."""
    (u, v, w, fold), s = grid, p["scale"]
    r = np.sqrt(_ell(u, v, w, (0, 0, 0), (0.82 * s, 0.88 * s, 0.78 * s)))         # 1 at the surface
    brain = r < 1
    lab = np.where(brain, 3, 0).astype(np.uint8)                                  # 0 bg 1 CSF 2 GM 3 WM 4 hippo
    lab[brain & (r > 1 - p["csf"] - p["cortex"] * (1 + 0.35 * fold))] = 2
    lab[brain & (r > 1 - p["csf"])] = 1
    au = np.abs(u)
    lab[_ell(au, v, w, (0.12 * s, -0.2 * s, -0.02), (0.09 * s, 0.12 * s, 0.1 * s)) < 1] = 2   # deep GM
    vs = p["vent"]
    lab[_ell(au, v, w, (0.12 * s, -0.03, 0.12 * s), (0.07 * s * vs, 0.3 * s * vs ** 0.5, 0.1 * s * vs)) < 1] = 1
    for side, f in ((-1, p["hippo_left"]), (1, p["hippo_right"])):
        c = (side * HIPPO_CENTRE[0] * s, HIPPO_CENTRE[1] * s, HIPPO_CENTRE[2] * s)
        lab[_ell(u, v, w, c, (0.14 * s, 0.3 * s, 0.13 * s)) < 1] = 1                # CSF pocket
        k = s * f ** (1 / 3)
        lab[_ell(u, v, w, c, (0.1 * k, 0.24 * k, 0.09 * k)) < 1] = 4                # hippocampus
    img = np.array([0.0, 0.15, 0.55, 0.9, 0.6], np.float32)[lab]
    img = ndimage.gaussian_filter(img, 0.6, truncate=2.0)                          # partial volume
    b = p["bias"]
    img *= 1 + b[0] * u + b[1] * v + b[2] * w + b[3] * u * v + b[4] * (w * w - 0.3)  # smooth bias field
    img += rng.normal(0, p["noise"], img.shape).astype(np.float32)
    img[~brain] = 0
    vals = img[brain]
    img[brain] = (vals - vals.mean()) / vals.std()                                 # Sec. 4.2.3
    return img


def head_anatomy(rng, scale, hippo, vent, csf, cortex):
    return {"scale": scale, "hippo_left": hippo * math.exp(-0.02 + rng.normal(0, 0.03)),
            "hippo_right": hippo * math.exp(0.02 + rng.normal(0, 0.03)), "vent": max(vent, 0.5),
            "csf": float(np.clip(csf, 0.02, 0.2)), "cortex": float(np.clip(cortex, 0.04, 0.2)),
            "bias": rng.normal(0, 0.06, 5), "noise": 0.04}


def synthetic_crops(shape, size):
    """Boxes centred on the synthetic hippocampi; the right box is the exact mirror of the left."""
    centre = [(c + 1) / 2 * (n - 1) for c, n in zip((-HIPPO_CENTRE[0],) + HIPPO_CENTRE[1:], shape)]
    left = [int(np.clip(round(c - d / 2), 0, n - d)) for c, d, n in zip(centre, size, shape)]
    right = [shape[0] - left[0] - size[0]] + left[1:]
    return HippocampusCrops(left, right, size)


@contextlib.contextmanager
def _cohort(task, out_dir, n, seed, verbose):
    """Write a cohort in a hidden sibling folder moved onto out_dir (absent, empty or an earlier cohort) when
    complete -> (rng, folder, save(subject, anatomy), info, written last as cohort.json)."""
    P = SYNTH[task]
    if n < 10:
        raise UserError(f"--n must be at least 10 for {'an AD' if task == 'ad' else 'a brain-age'} cohort (got {n})")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (not os.listdir(out_dir)
                                        or os.path.isfile(os.path.join(out_dir, "cohort.json")))):
        raise UserError(f"{out_dir}: exists and is not an empty folder or a synthetic cohort (no cohort.json in it); "
                        f"empty it, or choose another folder")   # synthetic.py's --out, or the trainers' --data-dir
    rng, grid = np.random.default_rng(seed), head_grid(P["shape"])
    shown = Progress(f"synth-{task}", n, "subjects", quiet=not verbose)
    tmp = os.path.join(os.path.dirname(out_dir), f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(out_dir)}")
    os.makedirs(os.path.join(tmp, "images"))

    def save(subject, anatomy):
        save_nifti(render_head(grid, anatomy, rng), P["spacing_mm"], os.path.join(tmp, "images", f"{subject}.nii.gz"))
        shown.advance()

    info = {"task": task.replace("-", "_"), "n": int(n), "seed": int(seed), "image_shape": list(P["shape"]),
            "spacing_mm": P["spacing_mm"]}
    try:
        yield rng, tmp, save, info
        write_json({**info, "generator": P}, os.path.join(tmp, "cohort.json"))
        old = tmp + ".old"
        if os.path.exists(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ad_hippocampus(dx, male, age, noise=0.0):
    """Hippocampal volume, 1 for a CN man of 73 (the AD model above)."""
    P = AD_SYNTH
    atrophy = P["hippo_atrophy"][dx] * (1 if male else P["hippo_atrophy_female_gain"])
    return ((1 if male else P["hippo_female_factor"]) * (1 - P["hippo_age_slope"] * (age - 73)) * (1 - atrophy)
            * math.exp(noise))


def make_synthetic_ad(out_dir, n=360, seed=0, verbose=False):
    """Write a synthetic AD cohort (ad.csv, images/<Subject>.nii.gz, crops.json, cohort.json) -> csv path."""
    P = AD_SYNTH
    with _cohort("ad", out_dir, n, seed, verbose) as (rng, tmp, save, info):
        f = np.array([P["class_fraction"][c] for c in CLASS_NAMES])
        counts = np.floor(n * f).astype(int)
        counts[np.argsort(-(n * f - counts))[: n - counts.sum()]] += 1       # largest remainders
        rows = []
        for i, g in enumerate(rng.permutation(np.repeat(np.arange(3), counts))):
            dx = CLASS_NAMES[g]
            male = rng.random() < P["male_fraction"][dx]
            age = float(np.clip(rng.normal(*P["age_mean_sd"][dx]), 55, 92))
            hippo = ad_hippocampus(dx, male, age, rng.normal(0, P["hippo_noise_sd"]))
            subj = f"SYN{i + 1:05d}"
            save(subj, head_anatomy(rng, (1.0 if male else 0.96) * math.exp(rng.normal(0, 0.02)), hippo,
                                    vent=1 + 0.025 * (age - 73) + (0, 0.1, 0.25)[g] + rng.normal(0, 0.08),
                                    csf=0.06 + 0.002 * (age - 73) + 0.01 * g,
                                    cortex=0.12 - 0.001 * (age - 73) - 0.008 * g))
            row = {"Subject": subj, "Group": dx, "AGE": f"{age:.1f}", "PTGENDER": "Male" if male else "Female",
                   "PTEDUCAT": str(int(np.clip(round(rng.normal(16.2 - 0.6 * (g == 2), 2.8)), 6, 20))),
                   "APOE4": str(int(rng.choice(3, p=P["apoe4_probs"][dx])))}
            miss = {k: rng.random() < p[g] for k, p in P["missing_prob"].items()}
            for col, (mu, sd, lim, dec) in P["biomarkers"].items():
                v = max(rng.normal(mu[g], sd[g]), 0.01)                       # as the assay reports it: censored
                row[col] = ("" if miss["CSF" if col in ("ABETA", "PTAU", "TAU") else col] else f">{lim[1]}"
                            if lim and v >= lim[1] else f"<{lim[0]}" if lim and v <= lim[0] else f"{v:.{dec}f}")
            rows.append(row)
        write_csv(rows, ["Subject", "Group"] + list(AD_ATTRIBUTES), os.path.join(tmp, "ad.csv"))
        synthetic_crops(P["shape"], P["crop_size"]).save(os.path.join(tmp, "crops.json"))
        info.update(crops="crops.json", class_counts=dict(zip(CLASS_NAMES, map(int, counts))))
    return os.path.join(os.path.abspath(out_dir), "ad.csv")


def brain_age_atrophy(age, male):
    """The atrophy index's mean at `age`: flat to 20, linear, then a steeper sex-specific term after 40."""
    P = BRAIN_AGE_SYNTH
    rate = np.where(male, P["atrophy_after_40"]["M"], P["atrophy_after_40"]["F"])
    return P["atrophy_linear"] * np.maximum(age - 20, 0) / 50 + rate * np.maximum(age - 40, 0) ** 2 / 2500


def brain_age_structures(brain_age, age, male):
    """Each structure's mean given the brain age (its atrophy index a), age and sex -> dict of arrays (broadcast)."""
    P, a = BRAIN_AGE_SYNTH, brain_age_atrophy(brain_age, male)
    return {"log_scale": np.log(np.where(male, P["head_scale"]["M"], P["head_scale"]["F"]))
            + np.log(0.92 + 0.08 * np.minimum(age, 14) / 14),                      # development to 14
            "log_vent": np.log(np.maximum(0.8 + 1.2 * a, 0.05)), "csf": 0.04 + 0.08 * a,
            "cortex": 0.15 - 0.02 * (np.minimum(age, 20) - 8) / 12 - 0.05 * a,      # thickens to 20, then thins
            "log_hippo": np.log(np.maximum(1 - 0.3 * a, 0.3))}


STRUCTURE_SD = {"log_scale": "head_scale_sd", "log_vent": "vent_sd", "csf": "csf_sd", "cortex": "cortex_sd",
                "log_hippo": "hippo_sd"}


def brain_age_anatomy(rng, n):
    """n subjects' ages, sexes, brain ages and structures (the latent anatomy the images are drawn from): (n,) each."""
    P = BRAIN_AGE_SYNTH
    lo, hi = P["age_range"]
    male = rng.random(n) < 0.5
    age = np.where(rng.random(n) < P["age_uniform_fraction"], rng.uniform(lo, hi, n),
                   np.clip(rng.normal(*P["age_bump"], n), lo, hi))
    gap_sd = np.where(male, P["brain_age_gap_sd"]["M"], P["brain_age_gap_sd"]["F"])
    brain_age = age + rng.normal(0, 1, n) * gap_sd             # the brain looks `gap` years older than it is
    mean = brain_age_structures(brain_age, age, male)
    return {"age": age, "male": male, "brain_age": brain_age,
            **{k: mean[k] + rng.normal(0, P[sd], n) for k, sd in STRUCTURE_SD.items()}}


def brain_age_oracle(anatomy, age_step=0.25):
    """Each subject's posterior-median age given its latent structures under the exact model (the gap integrated
    out) -> {"as_male", "as_female", "without_sex"}: (n,) years; the median minimises the expected absolute error."""
    P = BRAIN_AGE_SYNTH
    lo, hi = P["age_range"]
    ages = np.arange(lo, hi + age_step / 2, age_step)                              # (G,) chronological
    gap = np.arange(-15, 15 + age_step / 2, age_step)                              # (K,) brain age - age
    u, (mu, sd) = P["age_uniform_fraction"], P["age_bump"]
    log_prior = np.log(u / (hi - lo) + (1 - u) * np.exp(-0.5 * ((ages - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)))
    log_normal = lambda x, m, s: -0.5 * ((x - m) / s) ** 2 - math.log(s)
    # per sex (male, female): the structures' means on the (G, K) grid, the gap's log density (1, K)
    means = [brain_age_structures(ages[:, None] + gap[None, :], ages[:, None], male) for male in (True, False)]
    log_gap = [log_normal(gap, 0, P["brain_age_gap_sd"][sex])[None, :] for sex in "MF"]

    def median(log_post):
        p = np.exp(log_post - log_post.max())
        return np.interp(0.5, np.cumsum(p) / p.sum(), ages)

    n = len(anatomy["age"])
    out = {k: np.empty(n) for k in ("as_male", "as_female", "without_sex")}
    for i in range(n):
        log_lik = []                                                               # per sex: (G,)
        for mean, joint in zip(means, log_gap):
            for k, sd in STRUCTURE_SD.items():
                joint = joint + log_normal(anatomy[k][i], mean[k], P[sd])
            top = joint.max(1, keepdims=True)
            log_lik.append(top[:, 0] + np.log(np.exp(joint - top).sum(1)))
        out["as_male"][i], out["as_female"][i] = (median(ll + log_prior) for ll in log_lik)
        out["without_sex"][i] = median(np.logaddexp(*log_lik) + log_prior)
    return out


def make_synthetic_brain_age(out_dir, n=800, seed=0, verbose=False):
    """Write a synthetic brain-age cohort (brain_age.csv, images/, oracle.csv, cohort.json) -> csv path."""
    with _cohort("brain-age", out_dir, n, seed, verbose) as (rng, tmp, save, info):
        anat = brain_age_anatomy(rng, n)
        oracle = brain_age_oracle(anat)
        oracle["with_sex"] = np.where(anat["male"], oracle["as_male"], oracle["as_female"])
        subjects, columns = [f"BA{i + 1:05d}" for i in range(n)], ["with_sex", "without_sex", "as_male", "as_female"]
        for i, subj in enumerate(subjects):
            save(subj, head_anatomy(rng, math.exp(anat["log_scale"][i]), hippo=math.exp(anat["log_hippo"][i]),
                                    vent=math.exp(anat["log_vent"][i]), csf=anat["csf"][i], cortex=anat["cortex"][i]))
        write_csv([[s, f"{anat['age'][i]:.1f}", "M" if anat["male"][i] else "F", f"images/{s}.nii.gz"] for i, s in
                   enumerate(subjects)], ["Subject", "Age", "Sex", "image"], os.path.join(tmp, "brain_age.csv"))
        write_csv([[s] + [f"{oracle[c][i]:.2f}" for c in columns] for i, s in enumerate(subjects)],
                  ["Subject"] + ["oracle_" + c for c in columns], os.path.join(tmp, "oracle.csv"))
        mae = {k: float(np.mean(np.abs(oracle[k] - np.round(anat["age"], 1)))) for k in ("with_sex", "without_sex")}
        info["oracle_mae"] = mae
    if verbose:
        print(f"oracle MAE (the generative model, latent anatomy read exactly): {mae['with_sex']:.2f} years "
              f"knowing sex, {mae['without_sex']:.2f} without")
    return os.path.join(os.path.abspath(out_dir), "brain_age.csv")


BUILTIN = {"ad": ("synthetic_ad", "ad.csv", make_synthetic_ad, dict(n=600, seed=0)),
           "brain-age": ("synthetic_brain_age", "brain_age.csv", make_synthetic_brain_age, dict(n=800, seed=0))}


def builtin_cohort(task, data_dir, quiet=False):
    """The task's built-in cohort under data_dir, generated on first use or when another generator wrote it."""
    folder, name, make, options = BUILTIN[task]
    check_folder("--data-dir", data_dir, "the synthetic cohort")
    csv_path = os.path.abspath(os.path.join(data_dir, folder, name))
    os.makedirs(data_dir, exist_ok=True)
    # runs started at once (a job array): one generates, the others wait and find it
    with cache_lock(data_dir, f"checking or generating the synthetic {task} cohort"):
        for old in os.listdir(data_dir):    # the hidden folder of a generation killed (kill -9) half-way
            if old.startswith(".tmp-") and old.split("-", 2)[-1] in (folder, folder + ".old"):
                shutil.rmtree(os.path.join(data_dir, old), ignore_errors=True)
        info = {}
        with contextlib.suppress(OSError, ValueError), open(os.path.join(data_dir, folder, "cohort.json")) as f:
            info = json.load(f)
        if os.path.isfile(csv_path) and all(info.get(k) == v for k, v in
                                            json.loads(json.dumps({"generator": SYNTH[task], **options})).items()):
            return csv_path
        why = "its cohort.json is not the current generator's" if os.path.isfile(csv_path) else "first use only"
        shown = Progress(f"generating the synthetic {task} cohort", 1, quiet=quiet)
        shown.say(f"generating the synthetic {task} cohort in {os.path.dirname(csv_path)} ({why}) ...")
        make(os.path.dirname(csv_path), **options, verbose=not quiet)
        shown.say(f"generated in {duration_text(shown.elapsed())}")
    return csv_path


def oracle_report(cohort_dir, predictions=None):
    """The oracle's MAE with and without sex on a brain-age cohort (or a run's test subjects, beside the run's), and
    the sweep the cohort encodes (as a woman's minus as a man's) -> {name: regression_metrics, "sweep": {...}}"""
    table = read_brain_age_table(os.path.join(cohort_dir, "brain_age.csv"))
    path = os.path.join(cohort_dir, "oracle.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; --cohort must be a folder that `synthetic.py brain-age` wrote")
    oracle = {r["Subject"]: r for _, r in read_csv_rows(path, ("Subject",))[0]}
    index, subjects, run_pred = {s: i for i, s in enumerate(table.subjects)}, list(table.subjects), None
    if predictions is not None:
        with np.load(predictions) as p:
            subjects, run_pred = [str(s) for s in p["subjects"]], p["pred"]
    missing = [s for s in subjects if s not in oracle or s not in index]
    if missing:
        raise UserError(f"{predictions or path}: subject {missing[0]} is not in the cohort {cohort_dir} "
                        f"({len(missing)} of {len(subjects)} missing)")
    rows = [index[s] for s in subjects]
    age, sex = table.age[rows], table.sex[rows]
    read = lambda column: np.array([float(oracle[s]["oracle_" + column]) for s in subjects])
    out = {"oracle knowing sex": regression_metrics(age, read("with_sex"), sex),
           "oracle without sex": regression_metrics(age, read("without_sex"), sex)}
    if run_pred is not None:
        out["the run"] = regression_metrics(age, run_pred, sex)
    change = read("as_female") - read("as_male")
    out["sweep"] = {"female_minus_male": float(change.mean()), "sd": float(change.std()), "n": len(change)}
    return out


def main(argv=None):
    ap = ArgumentParser(description="Write a synthetic cohort in the real on-disk format, or the oracle's MAE.")
    sub = ap.add_subparsers(dest="task", required=True)
    for task in sorted(BUILTIN):
        s = sub.add_parser(task, help=f"write a synthetic {task} cohort")
        s.add_argument("--out", required=True, help="output folder (absent, empty, or an earlier cohort)")
        s.add_argument("--n", type=int, default=BUILTIN[task][3]["n"], help="subjects (default %(default)s)")
        s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("oracle", help="the oracle's MAE on a brain-age cohort or on a run's test subjects")
    s.add_argument("--cohort", required=True, help="a folder that `synthetic.py brain-age` wrote")
    s.add_argument("--predictions", help="a brain-age run's predictions.npz: the oracle on its test subjects")
    a = ap.parse_args(argv)
    if a.task == "oracle":
        res = oracle_report(a.cohort, a.predictions)
        sweep = res.pop("sweep")
        print(markdown_table(["", "MAE", "MAE male", "MAE female"],
                             [[k, fmt(m["mae"]), fmt(m["mae_male"]), fmt(m["mae_female"])] for k, m in res.items()]))
        print(f"the oracle's sweep: each of the {sweep['n']} scans read as a woman's is "
              f"{sweep['female_minus_male']:+.2f} ± {sweep['sd']:.2f} years older than read as a man's")
        return res
    check_number("--seed", a.seed, least=0)
    t0, P = time.time(), SYNTH[a.task]
    path = BUILTIN[a.task][2](a.out, a.n, a.seed, verbose=True)
    print(f"wrote {a.n} subjects to {path}, images {P['shape']} at {P['spacing_mm']} mm"
          + (f", crops {P['crop_size']}" if a.task == "ad" else "") + f", {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_cli(main)
