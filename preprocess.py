"""MRI preprocessing of App. A.1 (brain age; Sec. 4.2.3) in numpy, scipy and nibabel.

Steps: 1. reorient to RAS; 2. optional N4 bias correction (--n4, needs SimpleITK); 3. resample to isotropic
`spacing` mm (trilinear; the mask too, then > 0.5); 4. brain mask: --mask, or estimated (Otsu, largest component,
holes filled: right only for an already skull-stripped image); 5. crop or zero-pad to `shape` around the mask's
centre of mass; 6. divide by the mean of white matter (fuzzy c-means' brightest class, membership > 0.8; Reinhold
et al. 2019, as in the paper; step 7's z-score then undoes any scale, so step 6 leaves the output as it is and
only refuses an image whose white matter is not bright); 7. zero outside the mask, z-score the non-zero voxels inside
(Sec. 4.2.3). The paper normalises before resampling; after is the same up to interpolation and much cheaper. Not
done here: neck removal (FSL robustfov), skull stripping (ROBEX, FSL bet or HD-BET; pass the mask with --mask), N4
without SimpleITK (ANTs).

    python preprocess.py IN.nii[.gz] OUT.nii.gz [--mask MASK] [--spacing 1.75] [--shape 90 120 99] [--n4]
    python preprocess.py --csv TABLE.csv --out-dir DIR [--column image] [--mask-column mask]

Batch mode reads input paths (relative to the CSV) from --column (else <csv folder>/images/<Subject>.nii.gz), masks
from --mask-column (an empty cell: estimated, with a warning), writes DIR/<Subject>.nii.gz (kept when it exists,
unless --overwrite) and DIR/<table> whose `image` column points at them.
"""
import argparse
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from data import (ArgumentParser, Progress, UserError, atomic_path, check_number, check_subjects, find_image,
                  load_nifti, read_csv_rows, run_cli, same_file, warn, write_csv, zscore)

try:
    import SimpleITK as sitk   # optional: only --n4 needs it
except ImportError:
    sitk = None
NO_SITK = ("--n4 needs SimpleITK, which is not installed (pip install SimpleITK); "
           "or run ANTs N4BiasFieldCorrection beforehand and drop --n4")


def resample_isotropic(img, spacing):
    """Trilinear onto an axis-aligned grid of `spacing` mm over the same field of view; any affine, oblique too."""
    A = img.affine
    data = np.asarray(img.dataobj, dtype=np.float32)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in data.shape], [1], indexing="ij"), float).reshape(4, -1)
    world = (A @ corners)[:3]                                                      # (3, 8) mm
    lo, hi = world.min(1), world.max(1)
    out_shape = tuple(int(np.floor((h - l) / spacing + 1e-6)) + 1 for l, h in zip(lo, hi))
    new = np.diag([spacing, spacing, spacing, 1.0])
    new[:3, 3] = lo
    M = np.linalg.inv(A) @ new                                                     # new voxel -> old voxel
    out = ndimage.affine_transform(data, M[:3, :3], M[:3, 3], output_shape=out_shape, order=1)   # 0 outside
    return nib.Nifti1Image(out.astype(np.float32), new)


def estimate_brain_mask(data):
    """Foreground mask of a skull-stripped image: half Otsu's threshold, largest component, holes filled."""
    hist, edges = np.histogram(data[data > 0] if np.any(data > 0) else data.ravel(), bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0, m = np.cumsum(hist), np.cumsum(hist * centres)
    m0, m1 = m / np.maximum(w0, 1), (m[-1] - m) / np.maximum(w0[-1] - w0, 1)
    lab, n = ndimage.label(data > 0.5 * centres[np.argmax(w0 * (w0[-1] - w0) * (m0 - m1) ** 2)])
    if n == 0:
        raise UserError("no foreground found to estimate a brain mask")
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))


def crop_or_pad(data, affine, centre, shape):
    """Box of `shape` centred on voxel `centre` (zero outside the input) -> (data, affine)."""
    start = np.round(np.asarray(centre) - (np.asarray(shape) - 1) / 2).astype(int)
    out = np.zeros(shape, data.dtype)
    src = [slice(max(s, 0), min(s + n, m)) for s, n, m in zip(start, shape, data.shape)]
    dst = [slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start)]
    out[tuple(dst)] = data[tuple(src)]   # the box holds `centre`, a voxel of the input: they overlap
    new = affine.copy()
    new[:3, 3] = (affine @ np.append(start, 1.0))[:3]                             # voxel `start` becomes (0,0,0)
    return out, new


def fuzzy_cmeans(values, n_classes=3, m=2.0, max_iter=100, tol=1e-4, max_fit=200_000, seed=0):
    """Fuzzy c-means (Bezdek) on 1-D intensities (N,), fitted on at most `max_fit` drawn with a fixed seed ->
    (centroids (C,) ascending, memberships (N, C) of all)."""
    x = np.asarray(values, np.float64).ravel()
    if x.size < n_classes:
        raise UserError(f"fuzzy c-means needs at least {n_classes} brain voxels, got {x.size}")
    fit = x if x.size <= max_fit else np.random.default_rng(seed).choice(x, max_fit, replace=False)
    c = np.percentile(fit, np.linspace(10, 90, n_classes))

    def memberships(v, c):
        inv = (np.abs(v[:, None] - c[None, :]) + 1e-12) ** (-2.0 / (m - 1))   # (N, C)
        return inv / inv.sum(1, keepdims=True)

    for _ in range(max_iter):
        um = memberships(fit, c) ** m
        c, old = (um * fit[:, None]).sum(0) / um.sum(0), c
        if np.max(np.abs(c - old)) < tol * (np.ptp(fit) + 1e-12):
            break
    c = np.sort(c)
    return c, memberships(x, c)


def n4_correct(img, mask=None):
    if sitk is None:
        raise UserError(NO_SITK)
    data = np.asarray(img.dataobj, np.float32)
    s = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0)).copy())              # sitk arrays are (z, y, x)
    s.SetSpacing([float(z) for z in img.header.get_zooms()[:3]])
    m = mask if mask is not None else estimate_brain_mask(data)
    sm = sitk.GetImageFromArray(np.transpose(m.astype(np.uint8), (2, 1, 0)).copy())
    sm.CopyInformation(s)
    out = sitk.N4BiasFieldCorrectionImageFilter().Execute(s, sm)
    return nib.Nifti1Image(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)).astype(np.float32), img.affine)


def preprocess_volume(img, mask=None, spacing=1.75, shape=(90, 120, 99), n4=False, where="the image"):
    """App. A.1 after skull stripping, steps 1-7 above: nibabel image [+ mask image] -> the float32 NIfTI image;
    a box that cuts off more than 1% of the brain is said in a warning naming `where`."""
    img = nib.as_closest_canonical(img)
    if np.ptp(np.asarray(img.dataobj)) == 0:                                    # as data.load_volume
        raise UserError(f"no signal: every voxel is {np.asarray(img.dataobj).flat[0]:g} (a failed registration or an "
                        f"empty export?)")
    if mask is not None:
        mask = nib.as_closest_canonical(mask)
        if mask.shape[:3] != img.shape[:3] or not np.allclose(mask.affine, img.affine, atol=1e-3):
            raise UserError(f"mask shape {mask.shape[:3]} / affine does not match the image {img.shape[:3]}")
        mask = nib.Nifti1Image((np.asarray(mask.dataobj) > 0.5).astype(np.float32), mask.affine)   # 0 / 1
    if n4:
        img = n4_correct(img, None if mask is None else np.asarray(mask.dataobj) > 0.5)
    res = resample_isotropic(img, spacing)
    data = np.asarray(res.dataobj, np.float32)
    if mask is None and np.count_nonzero(data < 0) > 0.01 * np.count_nonzero(data):   # a T1 in scanner units: >= 0
        raise UserError(f"{np.count_nonzero(data < 0) / np.count_nonzero(data):.0%} of the voxels are negative: an "
                        f"image normalised already? The estimated brain mask (step 4) keeps the bright voxels alone; "
                        f"give the brain mask with --mask")
    m = estimate_brain_mask(data) if mask is None else np.asarray(resample_isotropic(mask, spacing).dataobj) > 0.5
    if not m.any():
        raise UserError("the brain mask is empty")
    centre = ndimage.center_of_mass(m)
    data, affine = crop_or_pad(data, res.affine, centre, tuple(shape))   # zeroed outside the mask below
    brain, (m, _) = np.count_nonzero(m), crop_or_pad(m, res.affine, centre, tuple(shape))
    kept = np.count_nonzero(m) / brain                     # said below, once no error can follow
    m &= data != 0
    _, u = fuzzy_cmeans(data[m])   # white matter: the brightest class, membership > 0.8, else where it is largest
    # (ties too: white matter most of the brain at one value, as FreeSurfer's 110, gives two equal centroids)
    wm_mean = float(data[m][u[:, -1] > 0.8 if (u[:, -1] > 0.8).any() else u[:, -1] == u.max(1)].mean())
    if not wm_mean > 0:
        raise UserError(f"white-matter mean is {wm_mean:.3g}; is this a T1 image?")
    if kept < 0.99:
        warn(f"{where}: the {' x '.join(map(str, shape))} box at {spacing:g} mm holds {kept:.0%} of the brain mask, "
             f"the rest is cut off; a larger --shape keeps it")
    out = nib.Nifti1Image(zscore(data / wm_mean, m), affine)                      # steps 6 and 7
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def preprocess_file(in_path, out_path, mask_path=None, spacing=1.75, shape=(90, 120, 99), n4=False, subject=None):
    img = load_nifti(in_path, subject, canonical=False)
    mask = load_nifti(mask_path, subject, canonical=False) if mask_path else None
    where = f"{in_path}{f' (subject {subject})' if subject else ''}"
    try:
        out = preprocess_volume(img, mask, spacing, shape, n4, where)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with atomic_path(out_path) as tmp:
        nib.save(out, tmp)


def _batch(a):
    rows, fields = read_csv_rows(a.csv, ("Subject",) + tuple(c for c in (a.column, a.mask_column) if c))
    subjects = check_subjects(a.csv, rows, as_file_names=True)  # DIR/<Subject>.nii.gz stays inside DIR
    base, table_out = os.path.dirname(os.path.abspath(a.csv)), os.path.join(a.out_dir, os.path.basename(a.csv))
    if same_file(table_out, a.csv):
        raise UserError(f"--out-dir {a.out_dir}: the table's copy would overwrite {a.csv} itself; "
                        f"choose another output folder")
    shown = Progress("preprocessing", len(rows), "subjects", a.quiet)
    for (line, r), subj in zip(rows, subjects):
        src = os.path.join(base, r.get(a.column or "image") or find_image(os.path.join(base, "images"), subj)
                           or os.path.join("images", f"{subj}.nii.gz"))
        mask = os.path.join(base, r[a.mask_column]) if a.mask_column and r.get(a.mask_column) else None
        out = os.path.join(a.out_dir, f"{subj}.nii.gz")
        if any(same_file(out, p) or os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p)
               for p in (src, mask) if p):         # by another path, or a link to it
            raise UserError(f"{a.csv} line {line}: --out-dir {a.out_dir}: {out} would overwrite its own input")
        if os.path.exists(out) and not a.overwrite:
            shown.total -= 1                      # kept as it is: no work, and not in the pace
            continue
        if a.mask_column and mask is None:
            warn(f"{a.csv} line {line}: subject {subj}: column {a.mask_column} is empty: the brain mask is estimated "
                 f"(step 4), right only for a skull-stripped image")
        try:
            preprocess_file(src, out, mask, a.spacing, a.shape, a.n4, subj)
        except UserError as exc:
            raise UserError(f"{a.csv} line {line}: {exc}") from None
        shown.advance()
    columns = [c for c in fields if c != a.mask_column] + ([] if "image" in fields else ["image"])
    write_csv([{**{c: r.get(c, "") for c in columns}, "image": f"{subj}.nii.gz"}
               for (_, r), subj in zip(rows, subjects)], columns, table_out)
    shown.finish(always=True)
    shown.say(f"wrote {table_out}")


def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", nargs="?", help="input NIfTI (single-file mode)")
    ap.add_argument("output", nargs="?", help="output .nii.gz (single-file mode)")
    ap.add_argument("--mask", help="brain mask NIfTI on the input's grid (default: estimated)")
    ap.add_argument("--spacing", type=float, default=1.75, help="isotropic voxel size in mm (default 1.75)")
    ap.add_argument("--shape", type=int, nargs=3, default=[90, 120, 99], help="output shape (default 90 120 99)")
    ap.add_argument("--n4", action="store_true", help="N4 bias correction with SimpleITK (must be installed)")
    ap.add_argument("--csv", help="batch mode: table with Subject and input paths")
    ap.add_argument("--out-dir", help="batch mode: output folder")
    ap.add_argument("--column", help="batch mode: input path column (default image, if there)")
    ap.add_argument("--mask-column", default=None, help="batch mode: brain mask path column")
    ap.add_argument("--overwrite", action="store_true", help="batch mode: redo existing outputs")
    ap.add_argument("--quiet", action="store_true", help="batch mode: no progress lines, only errors")
    a = ap.parse_args(argv)
    check_number("--spacing", a.spacing, least=0.1, most=20)   # mm
    check_number("--shape", a.shape, least=1, most=2048)       # voxels
    if a.n4 and sitk is None:
        raise UserError(NO_SITK)
    if a.csv and (a.input or a.output or a.mask or not a.out_dir):
        raise UserError("--csv: batch mode takes --csv and --out-dir, no positional paths and no --mask (each "
                        "subject's mask comes from --mask-column)")
    if a.csv:
        return _batch(a)
    if not (a.input and a.output):
        raise UserError("give IN.nii[.gz] OUT.nii.gz, or --csv TABLE --out-dir DIR")
    if not a.output.endswith((".nii", ".nii.gz")):
        raise UserError(f"{a.output}: the output must end in .nii or .nii.gz")
    if any(same_file(a.output, p) for p in (a.input, a.mask) if p):
        raise UserError(f"{a.output}: the output would overwrite its own input")
    preprocess_file(a.input, a.output, a.mask, a.spacing, a.shape, a.n4)
    print(f"wrote {a.output}", flush=True)


if __name__ == "__main__":
    run_cli(main)
