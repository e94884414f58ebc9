"""Real data in: the tables (tables.py), the images (images.py), Datasets, ADNIMERGE, previews, the checks.

On-disk format (the synthetic cohorts of synthetic.py use it too, so the demos exercise the real path):
    AD:        a CSV with Subject, Group, AGE, PTGENDER, PTEDUCAT, APOE4, ABETA, PTAU, TAU, FDG, AV45
               (ADNIMERGE names) and optionally `image` (path relative to the CSV), else
               <image dir>/<Subject>.nii.gz; crops.json with the hippocampus boxes.
    brain age: a CSV with Subject, Age, Sex (M/F) [, image]; images as above.
Every error is a UserError naming the file, subject, line or column. The tables are read by tables.py,
the images read, hashed and cropped by images.py and
cached by imagecache.py; their names are re-exported here, so `data`
stays the one door for data coming in.

Command line (bad input -> one line `error: ...` on stderr, exit status 2):
    python data.py check-ad CSV [--image-dir DIR] [--no-images] [--group-map SMC=CN] [--preview DIR]
    python data.py check-brain-age CSV [--image-dir DIR] [--no-images]
    python data.py from-adnimerge ADNIMERGE.csv --out table.csv [--visit bl] [--group-map SMC=CN]
--preview writes DIR/<name>_boxes.png and _crops.png, <name> the Subject, or for one that is not a plain
file name (`../../x`, from an `image` column) a safe name inside DIR (tables.output_names), printed.
from-adnimerge's table is written verbatim (the code reads it back), not escaped for spreadsheets.
"""
import math
import os

import numpy as np
import torch

from imagecache import ENTRY_MAGIC, ImageCache, entry_bytes  # noqa: F401
from images import (FLOAT16_MAX, SOURCES_INDEX, HippocampusCrops, cache_folder, cache_lock,  # noqa: F401
                    check_image_geometry, check_values, crops_path, file_sha256, image_fingerprint, image_geometry,
                    load_crops, load_nifti, load_volume, save_nifti, source_hashes)
from plots import write_png
from safeio import ArgumentParser, Progress, UserError, check_number, check_output, run_cli, warn, write_csv
from tables import (CLASS_NAMES, GROUP_ALIASES, ADTable, BrainAgeTable, check_subjects, diagnosis,  # noqa: F401
                    find_image, number_cell, output_names, parse_group_map, read_ad_table, read_brain_age_table,
                    read_csv_rows, skipped_summary, table_sha256)
from tabular import AD_ATTRIBUTES, is_missing_code


def sex_onehot(sex):
    """(N,) 0/1 -> (N, 2) float32 one-hot [male, female] (Sec. 4.2.3)."""
    sex = np.asarray(sex, np.int64)
    return np.eye(2, dtype=np.float32)[sex]


# ----------------------------------------------------------------------------------------------
# Datasets

def image_tensor(array):
    """A copy of an image as a tensor in float16 when it is stored so (the image cache's default), else in float32.
    Loaders ship the stored float16 (half the pinned memory, the shared memory of the workers and the bus) and
    training.to_device upcasts on the device; float16 -> float32 is exact, so the network sees the same numbers."""
    return torch.from_numpy(np.array(array, np.float16 if array.dtype == np.float16 else np.float32))


class ADDataset(torch.utils.data.Dataset):
    """(image, tabular, target) for AD classification (Sec. 3.5.2, 4.3.6).

    images[i]: a (X, Y, Z) volume (cropped here with `crops`) or an already cropped (2, D, H, W)
    pair. Training: one side drawn per sample with torch.randint (seeded by torch / the
    DataLoader worker), image (1, D, H, W). Evaluation: both sides, image (2, 1, D, H, W).
    """

    def __init__(self, images, tabular, labels, crops=None, train=True):
        assert len(images) == len(tabular) == len(labels)
        self.images, self.crops, self.train = images, crops, train
        self.tabular = torch.as_tensor(np.asarray(tabular, np.float32))
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        vol = self.images[i]
        if vol.ndim == 3 and self.crops is None:
            raise UserError(f"item {i}: a whole volume {tuple(vol.shape)} needs `crops` "
                            "(or a cache with the crops as transform)")
        pair = self.crops(vol) if vol.ndim == 3 else vol                           # (2, D, H, W)
        if self.train:
            side = int(torch.randint(2, (1,)))
            img = image_tensor(pair[side])[None]                                    # (1, D, H, W)
        else:
            img = image_tensor(pair)[:, None]                                       # (2, 1, D, H, W)
        return img, self.tabular[i], self.labels[i]


class BrainAgeDataset(torch.utils.data.Dataset):
    """(image (1, D, H, W), sex one-hot (2,), age scalar float32) for brain age (Sec. 3.5.1)."""

    def __init__(self, images, sex_onehot, age):
        assert len(images) == len(sex_onehot) == len(age)
        self.images = images
        self.tabular = torch.as_tensor(np.asarray(sex_onehot, np.float32))
        self.age = torch.as_tensor(np.asarray(age, np.float32))

    def __len__(self):
        return len(self.age)

    def __getitem__(self, i):
        return image_tensor(self.images[i])[None], self.tabular[i], self.age[i]


class TabularDataset(torch.utils.data.Dataset):
    """(empty image, tabular, target) for the tabular-only model, so the training loop is shared."""

    def __init__(self, tabular, labels):
        self.tabular = torch.as_tensor(np.asarray(tabular, np.float32))
        self.labels = torch.as_tensor(np.asarray(labels))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(0), self.tabular[i], self.labels[i]


# ----------------------------------------------------------------------------------------------
# ADNIMERGE as downloaded: one row per visit -> one row per subject

def from_adnimerge(path, out, visit="bl", dx_column=None, group_map=None):
    """Keep one row per subject of an ADNIMERGE export (PTID, VISCODE, DX_bl / DX, ...): the `visit`
    row, its diagnosis mapped to CN / MCI / AD (aliases and --group-map; other values and empty cells
    dropped with a count), the columns named as this project reads them; AGE is the age at that visit
    (AGE + Years_bl). Writes `out` atomically. -> a report of what was kept and dropped."""
    dx_column = dx_column or ("DX_bl" if visit == "bl" else "DX")
    rows, fields = read_csv_rows(path, ("PTID", "VISCODE", dx_column) + AD_ATTRIBUTES)
    kept, seen, dropped = [], set(), {}
    subjects = {r["PTID"] for _, r in rows if r["PTID"]}
    for line, r in rows:
        if r["VISCODE"].strip().lower() != visit.lower() or not r["PTID"] or r["PTID"] in seen:
            continue
        seen.add(r["PTID"])
        g = diagnosis(r[dx_column], group_map)
        if g is None:
            dropped[r[dx_column]] = dropped.get(r[dx_column], 0) + 1
            continue
        row = {"Subject": r["PTID"], "Group": g, **{a: r[a] for a in AD_ATTRIBUTES}}
        years = number_cell(path, line, r, "Years_bl", required=False) if "Years_bl" in fields else math.nan
        age = number_cell(path, line, r, "AGE", required=False)
        if math.isfinite(years) and math.isfinite(age):
            row["AGE"] = f"{age + years:.1f}"
        kept.append(row)
    if not kept:
        raise UserError(f"{path}: no subject has a {visit!r} visit with a CN, MCI or AD diagnosis in {dx_column}")
    write_csv(kept, ["Subject", "Group"] + list(AD_ATTRIBUTES), out)
    counts = ", ".join(f"{c} {sum(r['Group'] == c for r in kept)}" for c in CLASS_NAMES)
    return (f"kept {len(kept)} subjects ({counts}) from {len(rows)} rows -> {out}; dropped: "
            f"{len(subjects) - len(seen)} subjects without a {visit!r} visit"
            + "".join(f", {dx_column} {k or '(empty)'} {v}" for k, v in sorted(dropped.items())))


# ----------------------------------------------------------------------------------------------
# Previews: see the hippocampus boxes before training for days (plots.write_png: matplotlib's imsave when
# installed, else the standard library's zlib)

def _gray(plane):
    """A 2D slice -> (H, W, 3) uint8, 1st-99th percentile window, anterior / superior at the top."""
    lo, hi = np.percentile(plane, [1, 99])
    g = (np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).T[::-1]
    return np.repeat(g[:, :, None], 3, 2).copy()


def preview_crops(volume, crops, path_boxes, path_crops):
    """Two PNGs: the axial and coronal mid-slices through the boxes with the left (red) and right (green)
    boxes drawn; and the two crops' axial and coronal mid-slices (the right one mirrored)."""
    crops.check(volume.shape)
    panels = []
    for axis in (2, 1):                                                            # axial (z), coronal (y)
        k = crops.left_start[axis] + crops.size[axis] // 2
        img = _gray(np.take(volume, k, axis))
        a, b = [d for d in range(3) if d != axis]                                  # (x, y) or (x, z)
        for start, colour in ((crops.left_start, (255, 0, 0)), (crops.right_start, (0, 255, 0))):
            x0, x1 = start[a], start[a] + crops.size[a] - 1
            r0, r1 = img.shape[0] - 1 - (start[b] + crops.size[b] - 1), img.shape[0] - 1 - start[b]
            img[[r0, r1], x0:x1 + 1], img[r0:r1 + 1, [x0, x1]] = colour, colour
        panels.append(img)
    height = max(p.shape[0] for p in panels)
    pad = lambda p: np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0)))
    write_png(np.concatenate([pad(p) for p in panels], 1), path_boxes)
    pair = crops(volume)                                                           # (2, D, H, W)
    tiles = [_gray(np.take(side, side.shape[axis] // 2, axis)) for side in pair for axis in (2, 1)]
    height = max(t.shape[0] for t in tiles)
    write_png(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 2), (0, 0))) for t in tiles], 1), path_crops)


# ----------------------------------------------------------------------------------------------
# Command line

def _check_images(paths, subjects, quiet=False):
    """Every image's header (one shape, one voxel size), then every image decoded and validated, with progress
    lines when it is long (safeio.Progress, none when quiet). -> the shape."""
    shape, shown = None, Progress("checking the images", len(paths), "images", quiet)
    check_image_geometry(paths, subjects)
    for p, s in zip(paths, subjects):
        sh = load_volume(p, s, expected_shape=shape).shape
        shape = shape or sh
        shown.advance()
    shown.finish()
    return shape


def _empty_cells(raw):
    """How many cells of each attribute column are missing (empty, or ADNI's -4 / -1), with the fraction."""
    n = len(raw)
    counts = {a: sum(1 for r in raw if not r[a].strip() or is_missing_code(r[a])) for a in AD_ATTRIBUTES}
    return ", ".join(f"{a} {c}" + (f" ({c / n:.0%})" if c else "") for a, c in counts.items())


def main(argv=None):
    ap = ArgumentParser(description="Validate a table and every image it names, before a long run.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check-ad", "check-brain-age"):
        sp = sub.add_parser(name, help="validate a table and all its images, print a one-line summary")
        sp.add_argument("csv")
        sp.add_argument("--image-dir", default=None, help="default: <csv folder>/images")
        sp.add_argument("--no-images", action="store_true", help="check the table only")
        sp.add_argument("--quiet", action="store_true", help="no progress lines: the summary, warnings and errors")
        if name == "check-ad":
            sp.add_argument("--group-map", nargs="+", metavar="VALUE=DX", help="as in train_ad.py, e.g. SMC=CN")
            sp.add_argument("--crops", help="crops.json (default: next to the CSV, else the MNI152 boxes)")
            sp.add_argument("--preview", metavar="DIR", help="write PNGs of the boxes and crops of a few subjects")
            sp.add_argument("--preview-n", type=int, default=3, help="subjects to preview (default 3)")
    sp = sub.add_parser("from-adnimerge", help="one row per subject from ADNIMERGE.csv (one row per visit)")
    sp.add_argument("csv")
    sp.add_argument("--out", required=True, help="the table to write, as train_ad.py reads it")
    sp.add_argument("--visit", default="bl", help="VISCODE to keep (default bl, the baseline)")
    sp.add_argument("--dx-column", help="diagnosis column (default DX_bl at baseline, else DX)")
    sp.add_argument("--group-map", nargs="+", metavar="VALUE=DX", help="e.g. SMC=CN (default: such rows dropped)")
    a = ap.parse_args(argv)
    if a.cmd == "from-adnimerge":
        check_output("--out", a.out, [a.csv])
        print(from_adnimerge(a.csv, a.out, a.visit, a.dx_column, parse_group_map(a.group_map)))
        return
    if a.cmd == "check-ad":
        check_number("--preview-n", a.preview_n, least=1)
        if a.preview and a.no_images:
            raise UserError(f"--preview {a.preview}: previews need the images; drop --no-images")
        t = read_ad_table(a.csv, a.image_dir, need_images=not a.no_images, group_map=parse_group_map(a.group_map))
        if t.skipped:
            print(skipped_summary(t))
        shape = _check_images(t.image_paths, t.subjects, a.quiet) if t.image_paths else None
        crops = load_crops(a.crops, a.csv)
        own = crops_path(a.crops, a.csv)
        if shape and own:
            crops.check(shape, own)
        elif shape and any(s + d > n for st in (crops.left_start, crops.right_start)
                           for s, d, n in zip(st, crops.size, shape)):
            warn(f"no crops.json: the default MNI152 1 mm boxes do not fit images {shape}; image models "
                 f"need --crops FILE")
        if a.preview and t.image_paths:
            os.makedirs(a.preview, exist_ok=True)
            shown = t.subjects[:a.preview_n]
            names = output_names(shown)   # inside --preview whatever the Subject (`../../x` from an image column)
            for i, name in enumerate(names):
                base = os.path.join(a.preview, name)
                preview_crops(load_volume(t.image_paths[i], t.subjects[i]), crops, base + "_boxes.png",
                              base + "_crops.png")
            renamed = [f"{s!r} as {n}" for s, n in zip(shown, names) if s != n]
            print(f"wrote {2 * len(names)} PNGs to {a.preview}: <Subject>_boxes.png (axial and "
                  f"coronal mid-slices, left box red, right box green) and <Subject>_crops.png (both crops)"
                  + (f"; written under a safe file name: {', '.join(renamed)}" if renamed else ""))
        counts = ", ".join(f"{c} {int((t.labels == k).sum())}" for k, c in enumerate(CLASS_NAMES))
        absent = [c for k, c in enumerate(CLASS_NAMES) if not (t.labels == k).any()]
        if absent:
            warn(f"{a.csv}: no {' or '.join(absent)} subjects: train_ad.py needs every class in every subset "
                 f"(--classes 2 for CN vs AD)")
        print(f"ok: {a.csv}: {len(t.subjects)} subjects ({counts}), {int((t.sex == 0).sum())} male, age "
              f"{np.nanmean(t.age):.1f} +- {np.nanstd(t.age):.1f}, empty cells: {_empty_cells(t.raw)}"
              + (f", images {shape}" if shape else ""))
    else:
        t = read_brain_age_table(a.csv, a.image_dir, need_images=not a.no_images)
        shape = _check_images(t.image_paths, t.subjects, a.quiet) if t.image_paths else None
        print(f"ok: {a.csv}: {len(t.subjects)} subjects, {int((t.sex == 0).sum())} male, age "
              f"{t.age.mean():.1f} +- {t.age.std():.1f} ({t.age.min():.0f}-{t.age.max():.0f})"
              + (f", images {shape}" if shape else ""))


if __name__ == "__main__":
    run_cli(main)
