"""Tests of data.py and preprocess.py (to be merged into test_all.py). Fast: tiny cohorts, small images."""

import json
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import preprocess

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ad_cohort(tmp_path_factory):
    return data.make_synthetic_ad(tmp_path_factory.mktemp("ad") / "cohort", n=40, seed=3)


@pytest.fixture(scope="module")
def ba_cohort(tmp_path_factory):
    return data.make_synthetic_brain_age(tmp_path_factory.mktemp("ba") / "cohort", n=20, seed=4)


def table2_cohort(seed=0):
    """Labels, sex and age with the sizes and proportions of Table 2 (2120 subjects)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], [740, 1015, 365])
    male = rng.random(len(labels)) < np.array([309 / 740, 569 / 1015, 198 / 365])[labels]
    age = rng.normal(np.array([72.2, 72.8, 75.1])[labels], 7.4)
    return (~male).astype(np.int64), labels, age


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=HERE, capture_output=True, text=True)


def assert_clean_error(proc, *names):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for n in names:
        assert str(n) in proc.stderr, (n, proc.stderr)


def no_temp_files(folder):
    return not any(".tmp-" in f for f in os.listdir(folder))


def tiny_ad(folder, n=3, group="CN", age="70.5"):
    """A 3-subject AD table with tiny 8x8x8 images; returns the CSV path."""
    os.makedirs(folder / "images", exist_ok=True)
    rows = ["Subject,Group,AGE,PTGENDER,PTEDUCAT,APOE4,ABETA,PTAU,TAU,FDG,AV45"]
    for i in range(n):
        data._save_nifti(np.random.default_rng(i).random((8, 8, 8)).astype(np.float32), 2.0,
                         folder / "images" / f"S{i}.nii.gz")
        rows.append(f"S{i},{group if i == 1 else 'AD'},{age if i == 1 else '71'},Female,16,1,>1700,<8,300,,1.2")
    (folder / "ad.csv").write_text("\n".join(rows) + "\n")
    return folder / "ad.csv"

# -----------------------------------------------------------------------------
# splits (Sec. 4.3.4, App. C.1; Sec. 4.2.3)


def test_subsets_are_disjoint_and_together_hold_every_subject():
    sex, labels, age = table2_cohort()
    subsets = data.ad_split(sex, labels, age, seed=0)
    assert set(subsets.tolist()) == {0, 1, 2, 3, 4}
    assert np.bincount(subsets).max() - np.bincount(subsets).min() <= 1
    for fold in range(4):
        tr, va, te = data.ad_fold(subsets, fold)
        assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
        assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(labels)))


def test_test_subset_is_the_same_for_every_fold():
    sex, labels, age = table2_cohort()
    subsets = data.ad_split(sex, labels, age, seed=1)
    tests = [data.ad_fold(subsets, f)[2] for f in range(4)]
    assert all(np.array_equal(tests[0], t) for t in tests)
    vals = [set(data.ad_fold(subsets, f)[1]) for f in range(4)]
    assert all(not (vals[i] & vals[j]) for i in range(4) for j in range(i))
    with pytest.raises(data.DataError):
        data.ad_fold(subsets, 4)


def test_each_subset_keeps_the_diagnosis_and_sex_proportions():
    sex, labels, age = table2_cohort()
    for seed in range(3):
        subsets = data.ad_split(sex, labels, age, seed)
        for k in range(5):
            m = subsets == k
            for c in range(3):
                assert abs((labels[m] == c).mean() - (labels == c).mean()) < 0.03
            assert abs(sex[m].mean() - sex.mean()) < 0.03


def test_same_split_seed_same_split_other_seed_other_split():
    sex, labels, age = table2_cohort()
    a, b, c = (data.ad_split(sex, labels, age, s) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ages = np.random.default_rng(0).uniform(8, 90, 500)
    sexes = np.arange(500) % 2
    x, y, z = (data.brain_age_split(ages, sexes, s) for s in (1, 1, 2))
    assert all(np.array_equal(p, q) for p, q in zip(x, y)) and not np.array_equal(x[2], z[2])


def test_brain_age_split_is_80_10_10_and_keeps_age_and_sex():
    rng = np.random.default_rng(0)
    age, sex = rng.uniform(8, 90, 2000), rng.integers(0, 2, 2000)
    tr, va, te = data.brain_age_split(age, sex, seed=0)
    assert (len(tr), len(va), len(te)) == (1600, 200, 200)
    assert len(set(tr) | set(va) | set(te)) == 2000
    for part in (tr, va, te):
        assert abs(sex[part].mean() - sex.mean()) < 0.03
        assert abs(np.median(age[part]) - np.median(age)) < 3

# -----------------------------------------------------------------------------
# tabular preprocessing (Sec. 3.3, 4.3.3)


def test_censored_csf_values_read_as_the_assay_limit():
    assert data.parse_value(">1700") == 1700.0
    assert data.parse_value("<8") == 8.0
    assert np.isnan(data.parse_value(""))
    with pytest.raises(ValueError):
        data.parse_value("high")


def rows_with_missing(n=60, seed=0):
    """Raw rows like ADTable.raw; CSF missing in every third row, AV45 in every other, FDG every fourth."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = {"AGE": f"{rng.normal(73, 7):.1f}", "PTGENDER": "Male" if i % 2 else "Female",
             "PTEDUCAT": str(rng.integers(8, 20)), "APOE4": str(rng.integers(0, 3)),
             "ABETA": f"{rng.normal(900, 300):.1f}", "PTAU": f"{rng.normal(25, 8):.1f}",
             "TAU": f"{rng.normal(280, 90):.1f}", "FDG": f"{rng.normal(6, 0.6):.2f}", "AV45": ""}
        if i % 3 == 0:
            r["ABETA"] = r["PTAU"] = r["TAU"] = ""
        if i % 4 == 0:
            r["FDG"] = ""
        if i % 2 == 0:
            r["AV45"] = f"{rng.normal(1.2, 0.2):.2f}"
        if i == 5:
            r["ABETA"] = ">1700"
        rows.append(r)
    return rows


def test_imputation_is_fitted_on_training_rows_only():
    rows = rows_with_missing()
    train, test = rows[:45], [dict(r) for r in rows[45:]]
    state = data.TabularPreprocessor().fit(train).state_dict()
    test[0]["ABETA"], test[1]["FDG"], test[2]["AGE"] = "5", "", "99"
    test.append({"AGE": "55", "PTGENDER": "Male", "PTEDUCAT": "", "APOE4": "2", "ABETA": ">1700",
                 "PTAU": "<8", "TAU": "", "FDG": "", "AV45": ""})
    again = data.TabularPreprocessor().fit(train)
    again.transform(test)
    assert again.state_dict() == state


def test_missing_indicators_are_added_and_no_nan_remains():
    rows = rows_with_missing()
    tp = data.TabularPreprocessor().fit(rows[:45])
    assert tp.columns[:2] == ["PTGENDER_Male", "PTGENDER_Female"]
    ind = [c for c in tp.columns if c.endswith("_missing")]
    assert ind == ["ABETA_missing", "PTAU_missing", "TAU_missing", "FDG_missing", "AV45_missing"]
    X = tp.transform(rows)
    assert X.dtype == np.float32 and X.shape == (60, 2 + 8 + 5) and np.isfinite(X).all()
    j = tp.columns.index("ABETA_missing")
    assert X[0, j] == 1 and X[1, j] == 0
    z = X[:45, tp.columns.index("AGE")]
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4       # z-scored with training statistics


def test_tabular_state_round_trips_exactly(tmp_path):
    rows = rows_with_missing()
    tp = data.TabularPreprocessor().fit(rows[:45])
    torch.save({"tabular": tp.state_dict()}, tmp_path / "ck.pt")
    back = data.TabularPreprocessor.from_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["tabular"])
    via_json = data.TabularPreprocessor(state=json.loads(json.dumps(tp.state_dict())))
    assert np.array_equal(tp.transform(rows), back.transform(rows))
    assert np.array_equal(tp.transform(rows), via_json.transform(rows))
    assert back.columns == tp.columns


def test_imputation_replays_scikit_learns_iterative_imputer():
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer
    rows = rows_with_missing()
    tp = data.TabularPreprocessor().fit(rows[:45])
    _, X = tp.parse(rows)
    Z = (X - np.array(tp.state["mean"])) / np.array(tp.state["std"])
    imp = IterativeImputer(max_iter=10, random_state=0, keep_empty_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # ConvergenceWarning after max_iter rounds
        imp.fit(Z[:45])
    np.testing.assert_allclose(tp.transform(rows)[:, 2:10], imp.transform(Z), atol=1e-5)

# -----------------------------------------------------------------------------
# synthetic cohorts, loading, crops, cache, datasets


def test_synthetic_ad_cohort_loads_back_with_its_shapes_and_labels(ad_cohort):
    t = data.read_ad_table(ad_cohort)
    meta = json.load(open(os.path.join(os.path.dirname(ad_cohort), "cohort.json")))
    assert len(t.subjects) == 40 and t.labels.dtype == np.int64
    assert np.bincount(t.labels).tolist() == [meta["class_counts"][c] for c in data.CLASS_NAMES] == [14, 19, 7]
    assert all(os.path.isfile(p) for p in t.image_paths)
    vol = data.load_volume(t.image_paths[0])
    assert vol.shape == tuple(meta["image_shape"])
    assert np.allclose(nib.load(t.image_paths[0]).header.get_zooms(), meta["spacing_mm"])
    crops = data.HippocampusCrops.load(os.path.join(os.path.dirname(ad_cohort), "crops.json"))
    assert crops(vol).shape == (2,) + crops.size
    X = data.TabularPreprocessor().fit_transform(t.raw)
    assert X.shape == (40, 15)                                  # the paper's n_tab = 15
    two = data.read_ad_table(ad_cohort, classes=2)
    assert set(two.labels.tolist()) == {0, 1} and len(two.subjects) == 14 + 7
    text = open(ad_cohort).read()
    assert ",," in text                                         # empty cells = missing values


def test_synthetic_ad_anatomy_depends_on_diagnosis():
    rng = np.random.default_rng(0)
    grid = data._grid(data.AD_SYNTH["shape"])
    crops = data._ad_crops(data.AD_SYNTH["shape"], data.AD_SYNTH["crop_size"])
    dark = []
    for hippo in (1.0, 0.7):
        vol = data._render(grid, data._anatomy(rng, 1.0, hippo, 1.0, 0.06, 0.12), rng)
        dark.append((crops(vol) < -1.2).sum())                  # CSF around a smaller hippocampus
    assert dark[1] > dark[0] * 1.05


def test_synthetic_brain_age_cohort_loads_back(ba_cohort):
    t = data.read_brain_age_table(ba_cohort)
    assert len(t.subjects) == 20 and t.age.dtype == np.float32 and set(t.sex.tolist()) <= {0, 1}
    assert 8 <= t.age.min() and t.age.max() <= 90
    cache = data.ImageCache(t.image_paths, os.path.join(os.path.dirname(ba_cohort), "cache"), "float32",
                            expected_shape=data.BRAIN_AGE_SYNTH["shape"])
    ds = data.BrainAgeDataset(cache, data.sex_onehot(t.sex), t.age)
    img, tab, y = ds[0]
    assert img.shape == (1,) + data.BRAIN_AGE_SYNTH["shape"] and img.dtype == torch.float32
    assert tab.shape == (2,) and tab.sum() == 1 and y.dtype == torch.float32 and y.shape == ()
    brain = img[img != 0]
    assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2


def test_group_aliases_read_as_mci_and_ad(tmp_path):
    csv_path = tiny_ad(tmp_path, group="LMCI")
    text = csv_path.read_text().replace("S0,AD", "S0,Dementia").replace("S2,AD", "S2,EMCI")
    csv_path.write_text(text)
    assert data.read_ad_table(csv_path).labels.tolist() == [2, 1, 1]


def test_mirrored_crop_is_the_flip_of_the_right_box():
    vol = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    c = data.HippocampusCrops((1, 2, 3), (11, 4, 5), (6, 8, 7))
    left, right = c(vol)
    assert np.array_equal(left, vol[1:7, 2:10, 3:10])
    assert np.array_equal(right, np.flip(vol[11:17, 4:12, 5:12], axis=0))
    with pytest.raises(data.DataError):
        data.HippocampusCrops((15, 0, 0), (0, 0, 0), (6, 8, 7))(vol)


def test_cache_decodes_once_and_redecodes_a_changed_source(tmp_path):
    csv_path = tiny_ad(tmp_path)
    paths = data.read_ad_table(csv_path).image_paths
    crops = data.HippocampusCrops((0, 0, 0), (4, 0, 0), (4, 8, 8))
    cache = data.ImageCache(paths, tmp_path / "cache", "float16", transform=crops).prepare(progress=False)
    assert cache.n_decoded == 3
    first = np.array(cache[1])
    assert isinstance(cache[1], np.memmap) and first.shape == (2, 4, 8, 8) and first.dtype == np.float16
    again = data.ImageCache(paths, tmp_path / "cache", "float16", transform=crops)
    again.prepare(progress=False)
    np.array(again[1])
    assert again.n_decoded == 0                                 # served from the .npy, no gzip decode
    data._save_nifti(np.ones((8, 8, 8), np.float32), 2.0, paths[1])
    os.utime(paths[1], ns=(1, 10**18))                          # a changed source (new mtime)
    assert np.array_equal(np.array(again[1]), np.ones((2, 4, 8, 8)))
    assert again.n_decoded == 1
    assert len(os.listdir(tmp_path / "cache")) == 3             # the stale entry was removed
    other = data.ImageCache(paths, tmp_path / "cache", "float32", transform=crops)
    assert other[0].dtype == np.float32 and other.n_decoded == 1  # another dtype: its own entry
    assert len(os.listdir(tmp_path / "cache")) == 4 and again[0].dtype == np.float16


def test_dataset_items_have_one_side_in_training_and_both_in_evaluation(ad_cohort, tmp_path):
    t = data.read_ad_table(ad_cohort)
    crops = data.HippocampusCrops.load(os.path.join(os.path.dirname(ad_cohort), "crops.json"))
    cache = data.ImageCache(t.image_paths[:4], tmp_path / "c", "float16", transform=crops, names=t.subjects[:4])
    X = data.TabularPreprocessor().fit_transform(t.raw)[:4]
    train = data.ADDataset(cache, X, t.labels[:4], train=True)
    img, tab, y = train[2]
    assert img.shape == (1,) + crops.size and img.dtype == torch.float32
    assert tab.shape == (15,) and y.dtype == torch.int64 and y.shape == () and int(y) == t.labels[2]
    pair = np.array(cache[2], np.float32)
    torch.manual_seed(0)
    draws = [train[2][0][0].numpy() for _ in range(20)]
    sides = {next(k for k in range(2) if np.array_equal(d, pair[k])) for d in draws}
    assert sides == {0, 1}                                      # training draws either side
    ev = data.ADDataset(cache, X, t.labels[:4], train=False)
    img, _, _ = ev[2]
    assert img.shape == (2, 1) + crops.size and np.array_equal(img[:, 0].numpy(), pair)
    vols = [data.load_volume(p) for p in t.image_paths[:4]]     # uncropped volumes + crops also work
    assert data.ADDataset(vols, X, t.labels[:4], crops=crops, train=False)[0][0].shape == (2, 1) + crops.size
    img, tab, y = data.TabularDataset(X, t.labels[:4])[1]
    assert img.numel() == 0 and tab.shape == (15,) and y.dtype == torch.int64
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch[0].shape == (4, 1) + crops.size


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with data.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with data.atomic_path(target) as tmp:
        open(tmp, "w").write("{}")
    assert os.listdir(tmp_path) == ["out.json"]

# -----------------------------------------------------------------------------
# preprocess.py (App. A.1)


def synthetic_head(tmp_path):
    """A 1 mm LAS head: off-centre ellipsoidal brain (CSF, GM, WM) with a smooth bias, and its mask."""
    shape = (150, 176, 150)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.array([70.0, 96.0, 80.0])
    r = np.sqrt(((i - centre[0]) / 62) ** 2 + ((j - centre[1]) / 78) ** 2 + ((k - centre[2]) / 58) ** 2)
    vol = np.where(r < 1, 0.9, 0.0) - np.where((r < 1) & (r > 0.8), 0.35, 0) - np.where((r > 0.92) & (r < 1), 0.4, 0)
    vol = (vol * (1 + 0.1 * (i / shape[0] - 0.5))).astype(np.float32)
    affine = np.array([[-1, 0, 0, 80], [0, 1, 0, -110], [0, 0, 1, -70], [0, 0, 0, 1]], float)  # LAS, 1 mm
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "head.nii.gz")
    nib.save(nib.Nifti1Image((r < 1).astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    return tmp_path / "head.nii.gz", tmp_path / "mask.nii.gz", affine @ np.append(centre, 1)


@pytest.mark.parametrize("with_mask", [True, False])
def test_preprocess_gives_a_centred_zscored_90x120x99_volume_at_1_75mm(tmp_path, with_mask):
    head, mask, world_centre = synthetic_head(tmp_path)
    out = tmp_path / "out.nii.gz"
    preprocess.preprocess_file(head, out, mask if with_mask else None)
    img = nib.load(out)
    vol = img.get_fdata()
    assert vol.shape == (90, 120, 99)
    assert np.allclose(img.header.get_zooms(), 1.75)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    nz = vol != 0
    com = np.array(np.nonzero(nz)).mean(1)
    assert np.all(np.abs(com - (np.array(vol.shape) - 1) / 2) <= 2)
    assert np.allclose((img.affine @ np.append(com, 1))[:3], world_centre[:3], atol=2 * 1.75)
    assert abs(vol[nz].mean()) < 1e-4 and abs(vol[nz].std() - 1) < 1e-3


def test_preprocess_batch_mode_writes_every_subject_and_names_a_bad_row(tmp_path):
    csv_path = tiny_ad(tmp_path)
    args = ["--csv", csv_path, "--out-dir", tmp_path / "pre", "--shape", 6, 6, 6, "--spacing", 2]
    p = run("preprocess.py", *args)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "pre")) == ["S0.nii.gz", "S1.nii.gz", "S2.nii.gz", "ad.csv"]
    assert data.read_ad_table(tmp_path / "pre" / "ad.csv").image_paths[2] == str(tmp_path / "pre" / "S2.nii.gz")
    assert nib.load(tmp_path / "pre" / "S1.nii.gz").shape == (6, 6, 6)
    os.remove(tmp_path / "images" / "S2.nii.gz")
    assert_clean_error(run("preprocess.py", *args, "--overwrite"), "ad.csv line 4", "S2.nii.gz")
    assert no_temp_files(tmp_path / "pre")


def test_fuzzy_cmeans_finds_three_tissue_classes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 0.03, 3000) for m in (0.2, 0.55, 0.9)])
    c, u = preprocess.fuzzy_cmeans(x)
    assert np.allclose(c, [0.2, 0.55, 0.9], atol=0.02)
    assert u.shape == (9000, 3) and np.allclose(u.sum(1), 1)


def test_preprocess_n4_without_simpleitk_says_so(tmp_path):
    try:
        import SimpleITK  # noqa: F401
        pytest.skip("SimpleITK is installed")
    except ImportError:
        pass
    head = tmp_path / "h.nii.gz"
    data._save_nifti(np.ones((8, 8, 8), np.float32), 1.0, head)
    with pytest.raises(data.DataError, match="SimpleITK"):
        preprocess.main([str(head), str(tmp_path / "o.nii.gz"), "--n4"])
    assert not (tmp_path / "o.nii.gz").exists()

# -----------------------------------------------------------------------------
# bad input: one line `error: ...`, exit status 2, no traceback, no partial output


def test_missing_nifti_is_named(tmp_path):
    csv_path = tiny_ad(tmp_path)
    os.remove(tmp_path / "images" / "S1.nii.gz")
    assert_clean_error(run("data.py", "check-ad", csv_path), "S1", "S1.nii.gz", "line 3")


def test_truncated_nifti_is_named(tmp_path):
    csv_path = tiny_ad(tmp_path)
    p = tmp_path / "images" / "S2.nii.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    assert_clean_error(run("data.py", "check-ad", csv_path), "S2.nii.gz", "truncated")
    with pytest.raises(data.DataError, match="S2.nii.gz"):
        preprocess.preprocess_file(p, tmp_path / "o.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists() and no_temp_files(tmp_path)


def test_4d_image_is_named_with_its_shape(tmp_path):
    csv_path = tiny_ad(tmp_path)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), tmp_path / "images" / "S0.nii.gz")
    assert_clean_error(run("data.py", "check-ad", csv_path), "S0.nii.gz", "(8, 8, 8, 2)")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 1), np.float32), np.eye(4)), tmp_path / "images" / "S0.nii.gz")
    assert data.load_volume(tmp_path / "images" / "S0.nii.gz").shape == (8, 8, 8)   # trailing 1 squeezed


def test_nan_voxels_are_named_and_preprocess_writes_nothing(tmp_path):
    csv_path = tiny_ad(tmp_path)
    vol = np.ones((8, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    data._save_nifti(vol, 2.0, tmp_path / "images" / "S1.nii.gz")
    assert_clean_error(run("data.py", "check-ad", csv_path), "S1.nii.gz", "NaN")
    out = tmp_path / "out" / "o.nii.gz"
    assert_clean_error(run("preprocess.py", tmp_path / "images" / "S1.nii.gz", out), "S1.nii.gz", "NaN")
    assert not out.exists()


def test_csv_without_group_names_the_column(tmp_path):
    csv_path = tiny_ad(tmp_path)
    csv_path.write_text(csv_path.read_text().replace("Group", "Diagnosis"))
    assert_clean_error(run("data.py", "check-ad", csv_path), "ad.csv", "Group")


def test_unknown_diagnosis_names_the_row_and_value(tmp_path):
    csv_path = tiny_ad(tmp_path, group="XYZ")
    assert_clean_error(run("data.py", "check-ad", csv_path), "ad.csv", "line 3", "XYZ", "S1")


def test_non_numeric_age_names_the_row_and_column(tmp_path):
    csv_path = tiny_ad(tmp_path, age="seventy")
    assert_clean_error(run("data.py", "check-ad", csv_path, "--no-images"), "line 3", "AGE", "seventy")
    with pytest.raises(data.DataError, match="line 3.*AGE"):
        data.read_ad_table(csv_path)
    csv_path.write_text(csv_path.read_text().replace("seventy", "70,extra"))
    with pytest.raises(data.DataError, match="line 3: 12 fields, the header has 11"):
        data.read_ad_table(csv_path)
    csv_path.write_bytes(b"Subject,Group\n\xff\xfe,CN\n")
    with pytest.raises(data.DataError, match="UTF-8"):
        data.read_ad_table(csv_path)


def test_check_ad_accepts_a_good_table(tmp_path, capsys):
    data.main(["check-ad", str(tiny_ad(tmp_path))])
    out = capsys.readouterr().out
    assert out.startswith("ok:") and "CN 1, MCI 0, AD 2" in out


def test_failed_synthesis_leaves_no_partial_cohort(tmp_path, monkeypatch):
    calls = []

    def failing_save(vol, spacing, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", str(path))
        return real(vol, spacing, path)

    real = data._save_nifti
    monkeypatch.setattr(data, "_save_nifti", failing_save)
    with pytest.raises(OSError):
        data.make_synthetic_ad(tmp_path / "cohort", n=12)
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="mine"):
        data.main(["synth-ad", "--out", str(tmp_path / "mine"), "--n", "12"])
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and no_temp_files(tmp_path)
    with pytest.raises(data.DataError, match="--n"):
        data.make_synthetic_brain_age(tmp_path / "x", n=3)
    assert not (tmp_path / "x").exists()
