"""Tests of evaluate.py (to be merged into test_all.py). Fast: fake run folders, no training."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

import data
import evaluate
import train_ad
from evaluate import classification_metrics, entropy, entropy_weighted_ensemble

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["PTGENDER_Male", "PTGENDER_Female"] + list(data.AD_CONTINUOUS)
NAMES = ["CN", "MCI", "AD"]


# ------------------------------------------------------------------------------------------------
# fake runs: the files train_ad.py / train_brain_age.py write, with made-up predictions

def fake_ad_run(runs, model, seed, version, fold, probs, labels, subjects=None, **config):
    run_dir = evaluate.ad_run_dir(runs, model, seed, version, fold)
    os.makedirs(run_dir, exist_ok=True)
    cfg = {"task": "ad", "model": model, "split_seed": seed, "fold": fold, "version": version, "classes": 3,
           "n_tabular": len(COLUMNS), "tabular_columns": COLUMNS, "class_names": NAMES, **config}
    torch.save({"model": {}, "config": cfg, "epoch": 0, "best": {}}, os.path.join(run_dir, "best.pt"))
    subjects = subjects if subjects is not None else [f"S{seed}-{i}" for i in range(len(labels))]
    np.savez(os.path.join(run_dir, "predictions.npz"), subjects=np.array(subjects), labels=np.asarray(labels),
             probs=np.asarray(probs))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"val": {}, "test": classification_metrics(labels, probs, NAMES), "best_epoch": 0}, f)
    return run_dir


def random_probs(rng, n, c=3, sharp=2.0):
    logits = rng.normal(0, sharp, (n, c))
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def fake_brain_age_run(runs, folder, version, val_mae, pred, age, sex, model="hyperfusion", train_sex="all"):
    run_dir = os.path.join(runs, "brain-age", folder, f"v{version}")
    os.makedirs(run_dir, exist_ok=True)
    cfg = {"task": "brain-age", "model": model, "split_seed": 0, "version": version, "embedding_dim": 1,
           "train_sex": train_sex}
    torch.save({"model": {}, "config": cfg, "epoch": 0, "best": {}, "age_centre": 50.0},
               os.path.join(run_dir, "best.pt"))
    np.savez(os.path.join(run_dir, "predictions.npz"), subjects=np.array([f"B{i}" for i in range(len(age))]),
             age=np.asarray(age, np.float32), sex=np.asarray(sex), pred=np.asarray(pred, np.float32))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"val": {"mae": val_mae}, "test": evaluate.regression_metrics(age, pred, sex), "best_epoch": 0}, f)
    return run_dir


# ------------------------------------------------------------------------------------------------
# Eq. 7-8

def test_eq7_8_equal_entropies_give_the_plain_mean():
    # a permutation keeps the entropy, so alpha = 1/2 each
    probs = np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.2, 0.7]]])
    np.testing.assert_allclose(entropy_weighted_ensemble(probs), [[0.4, 0.2, 0.4]], atol=1e-12)
    three = np.array([[[0.5, 0.3, 0.2]], [[0.2, 0.5, 0.3]], [[0.3, 0.2, 0.5]]])
    np.testing.assert_allclose(entropy_weighted_ensemble(three), [[1 / 3, 1 / 3, 1 / 3]], atol=1e-12)


def test_eq7_8_a_near_one_hot_member_dominates_a_flat_one():
    sharp, flat = [0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]
    h_sharp = -(0.98 * math.log(0.98) + 2 * 0.01 * math.log(0.01))     # 0.1119 nats
    h_flat = math.log(3)                                                  # 1.0986 nats
    a_sharp = (1 / h_sharp) / (1 / h_sharp + 1 / h_flat)                  # Eq. 8: 0.9076
    expected = a_sharp * np.array(sharp) + (1 - a_sharp) * np.array(flat)  # Eq. 7
    # two samples: the weights are per sample, so swapping the members' roles swaps the result
    probs = np.array([[sharp, flat], [flat, sharp]])                      # (K=2, B=2, C=3)
    out = entropy_weighted_ensemble(probs)
    np.testing.assert_allclose(out, [expected, expected], rtol=1e-9)
    assert out[0, 0] > 0.9 > np.mean([0.98, 1 / 3])                       # far above the plain mean
    assert entropy(flat) == pytest.approx(h_flat)
    np.testing.assert_allclose(out.sum(1), 1.0)


# ------------------------------------------------------------------------------------------------
# Eq. 9-10 and the other metrics

def test_metrics_against_a_hand_made_confusion_matrix():
    cm = np.array([[4, 1, 0],     # true CN
                   [2, 2, 1],     # true MCI
                   [0, 1, 1]])    # true AD
    labels = np.repeat([0, 1, 2], cm.sum(1))
    pred = np.repeat(np.tile([0, 1, 2], 3), cm.ravel())           # row by row, as many of each as the cell says
    m = classification_metrics(labels, np.eye(3)[pred] * 0.8 + 0.2 / 3, NAMES)
    recall = [4 / 5, 2 / 5, 1 / 2]                  # TP / (TP + FN), rows
    precision = [4 / 6, 2 / 4, 1 / 2]               # TP / (TP + FP), columns
    assert m["confusion_matrix"] == cm.tolist()
    assert m["tp_rate"] == pytest.approx(dict(zip(NAMES, recall)))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recall))     # Eq. 9: 0.5667
    assert m["precision"] == pytest.approx(np.mean(precision))          # Eq. 10: 0.5556
    assert m["f1_macro"] == pytest.approx(np.mean([2 * p * r / (p + r) for p, r in zip(precision, recall)]))
    assert m["n"] == 12


def test_auc_and_maes_by_hand():
    # binary AUC: of the 4 (negative, positive) pairs, 3 rank the positive higher
    m = classification_metrics([0, 0, 1, 1], [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]], ["CN", "AD"])
    assert m["auc_macro"] == pytest.approx(0.75)
    r = evaluate.regression_metrics([50, 60, 70, 80], [52, 57, 70, 84], [0, 1, 0, 1])
    assert (r["mae"], r["mae_male"], r["mae_female"]) == pytest.approx((2.25, 1.0, 3.5))


# ------------------------------------------------------------------------------------------------
# the AD table (Table 3), late fusion (App. B), refusals

GROUPS = [(0, 0), (0, 1), (1, 0)]


@pytest.fixture
def ad_runs(tmp_path):
    """imaging, tabular and hyperfusion runs for three (seed, version) groups of four folds; an
    incomplete daft group. -> (runs dir, {(model, seed, version): fold probs (4, N, C)}, labels per seed)."""
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, 20) for s in (0, 1)}
    made = {}
    for model, skill in [("imaging", 0.5), ("tabular", 1.0), ("hyperfusion", 3.0)]:
        for seed, version in GROUPS:
            folds = []
            for fold in range(4):
                p = random_probs(rng, 20) + skill * np.eye(3)[labels[seed]]
                p /= p.sum(1, keepdims=True)
                fake_ad_run(tmp_path, model, seed, version, fold, p, labels[seed])
                folds.append(p)
            made[(model, seed, version)] = np.stack(folds)
    for fold in range(3):  # fold 3 never finished
        fake_ad_run(tmp_path, "daft", 0, 0, fold, random_probs(rng, 20), labels[0])
    return tmp_path, made, labels


def test_ad_table_has_a_row_per_seed_and_version_with_mean_std_and_mann_whitney(ad_runs, capsys):
    runs, made, labels = ad_runs
    res = evaluate.evaluate_ad(str(runs))
    by = {m["model"]: m for m in res["models"]}
    assert list(by) == ["imaging", "tabular", "late-fusion", "hyperfusion"]      # Table 3's order; daft incomplete
    assert any("daft" in s for s in res["incomplete"])
    for model in ("imaging", "tabular", "hyperfusion"):
        rows = by[model]["rows"]
        assert [(r["split_seed"], r["version"]) for r in rows] == GROUPS
        for r in rows:  # each row: the Eq. 7-8 ensemble of its four folds
            ens = entropy_weighted_ensemble(made[(model, r["split_seed"], r["version"])])
            assert r["metrics"] == classification_metrics(labels[r["split_seed"]], ens, NAMES)
        ba = [r["BA"] for r in rows]
        assert by[model]["mean"]["BA"] == pytest.approx(np.mean(ba))
        assert by[model]["std"]["BA"] == pytest.approx(np.std(ba, ddof=1))
        summed = np.sum([r["metrics"]["confusion_matrix"] for r in rows], 0)
        assert np.array_equal(by[model]["confusion_matrix"], summed)
    for col in ("BA", "AUC", "TP-MCI"):
        expected = mannwhitneyu([r[col] for r in by["imaging"]["rows"]], [r[col] for r in by["hyperfusion"]["rows"]],
                                alternative="two-sided").pvalue
        assert by["imaging"]["p_value"][col] == pytest.approx(expected)
    assert math.isnan(by["hyperfusion"]["p_value"]["BA"])
    # late fusion: the plain average of the imaging and tabular ensembles, per (seed, version)
    for r in by["late-fusion"]["rows"]:
        key = (r["split_seed"], r["version"])
        fused = (entropy_weighted_ensemble(made[("imaging", *key)])
                 + entropy_weighted_ensemble(made[("tabular", *key)])) / 2
        assert r["metrics"] == classification_metrics(labels[key[0]], fused, NAMES)
    # written in three forms, and printed
    md = (runs / "results_ad.md").read_text()
    assert "Late fusion" in md and "HyperFusion" in md and " ± " in md and "TP-MCI" in md
    with open(runs / "results_ad.json") as f:
        assert len(json.load(f)["models"]) == 4
    csv_lines = (runs / "results_ad.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[0].startswith("model,rows,BA mean,BA std,BA p")
    assert "Imaging only" in capsys.readouterr().out


@pytest.mark.parametrize("key,value", [("split_seed", 1), ("tabular_columns", COLUMNS + ["ABETA_missing"]),
                                       ("classes", 2)])
def test_folds_whose_configs_differ_are_refused(tmp_path, key, value):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 10)
    for fold in range(4):
        differ = {key: value} if fold == 2 else {}
        fake_ad_run(tmp_path, "concat", 0, 0, fold, random_probs(rng, 10), labels, **differ)
    with pytest.raises(data.DataError, match=f"cannot ensemble .*fold0 and .*fold2: {key} differs"):
        evaluate.ad_results(str(tmp_path))


def test_folds_with_other_test_subjects_are_refused_and_the_cli_says_so_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 10)
    for fold in range(4):
        subjects = [f"S{i + (fold == 3)}" for i in range(10)]
        fake_ad_run(tmp_path, "film", 0, 0, fold, random_probs(rng, 10), labels, subjects=subjects)
    with pytest.raises(data.DataError, match="fold0 and .*fold3: their test subjects differ"):
        evaluate.ad_results(str(tmp_path))
    proc = subprocess.run([sys.executable, "evaluate.py", "ad", "--runs", str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot ensemble"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# brain age: the ensemble of the 5 best versions (Sec. 4.2.2), Fig. 4A

def test_brain_age_ensembles_the_five_versions_with_the_lowest_validation_mae(tmp_path):
    rng = np.random.default_rng(3)
    age, sex = rng.uniform(20, 80, 30), np.arange(30) % 2
    val_mae = [5.0, 1.0, 6.0, 2.0, 3.0, 7.0, 4.0]
    preds = {v: age + rng.normal(0, 3, 30) for v in range(7)}
    for v, mae in enumerate(val_mae):
        fake_brain_age_run(tmp_path, "hyperfusion", v, mae, preds[v], age, sex)
    for train_sex in ("M", "F"):
        fake_brain_age_run(tmp_path, f"hyperfusion-train{train_sex}", 0, 1.0, age + 2, age, sex, train_sex=train_sex)
    res = evaluate.evaluate_brain_age(str(tmp_path), quiet=True)
    hf = next(m for m in res["models"] if m["folder"] == "hyperfusion")
    assert hf["versions"] == [1, 3, 4, 6, 0]                              # val MAE 1, 2, 3, 4, 5
    expected = evaluate.regression_metrics(age, np.mean([preds[v] for v in (1, 3, 4, 6, 0)], 0), sex)   # Eq. 6
    assert hf["metrics"] == pytest.approx(expected)
    assert [r["train"] for r in res["fig4a"]] == ["M", "F"]
    assert [(r["male"], r["female"], r["all"]) for r in res["fig4a"]] == [pytest.approx((2, 2, 2), abs=1e-4)] * 2
    md = (tmp_path / "results_brain-age.md").read_text()
    assert "Fig. 4A" in md and "1, 3, 4, 6, 0 of 7" in md


# ------------------------------------------------------------------------------------------------
# run-protocol: trains only what is missing

def test_the_runner_skips_finished_runs_resumes_interrupted_ones_and_trains_the_rest(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 12)
    fake_ad_run(tmp_path, "hyperfusion", 0, 0, 0, random_probs(rng, 12), labels)       # finished
    fake_ad_run(tmp_path, "hyperfusion", 0, 0, 1, random_probs(rng, 12), labels)       # finished
    interrupted = evaluate.ad_run_dir(tmp_path, "hyperfusion", 0, 0, 2)
    os.makedirs(interrupted)
    open(os.path.join(interrupted, "last.pt"), "w").close()                              # no metrics.json
    calls = []

    def fake_train(args):
        calls.append(args)
        fake_ad_run(args["out"], args["model"], args["split_seed"], args["version"], args["fold"],
                    random_probs(rng, 12), labels)
        return {}

    monkeypatch.setattr(train_ad, "train_ad", fake_train)
    trained, skipped, res = evaluate.run_protocol("ad", str(tmp_path), models=["hyperfusion"], epochs=1,
                                                  data_csv="x.csv")
    assert [(a["fold"], a["resume"]) for a in calls] == [(2, True), (3, False)]
    assert all(a["epochs"] == 1 and a["data_csv"] == "x.csv" and a["quiet"] and a["model"] == "hyperfusion"
               for a in calls)
    assert len(skipped) == 2 and len(trained) == 2
    assert [m["model"] for m in res["models"]] == ["hyperfusion"] and res["models"][0]["n_rows"] == 1
    assert "skipped (finished)" in capsys.readouterr().out
    calls.clear()
    trained, skipped, _ = evaluate.run_protocol("ad", str(tmp_path), models=["hyperfusion"], epochs=1)
    assert calls == [] and trained == [] and len(skipped) == 4                          # a restart trains nothing


# ------------------------------------------------------------------------------------------------
# sweep (Sec. 1: adjusted at test time) and select-layers, on tiny cohorts with untrained models

@pytest.fixture(scope="module")
def ba_cohort(tmp_path_factory):
    return data.make_synthetic_brain_age(tmp_path_factory.mktemp("ba") / "cohort", n=20, seed=0)


@pytest.fixture(scope="module")
def ad_cohort(tmp_path_factory):
    return data.make_synthetic_ad(tmp_path_factory.mktemp("ad") / "cohort", n=30, seed=0)


def test_brain_age_sweep_reads_every_test_scan_as_male_and_as_female(ba_cohort, tmp_path):
    from layers import init_hyperlayers
    from models import build_model
    torch.manual_seed(0)
    shape = data.BRAIN_AGE_SYNTH["shape"]
    results = {}
    for name in ("hyperfusion", "imaging"):
        model = build_model("brain-age", name, image_shape=shape)
        if name == "hyperfusion":  # the embeddings start at e = 1 for both sexes (SPEC §1): make them differ
            for layer in model.linears:
                getattr(model, layer).hypernet.embedding.weight.data = torch.tensor([[1.0, 2.0]])
            init_hyperlayers(model, torch.eye(2)[torch.arange(10) % 2])
        cfg = {"task": "brain-age", "model": name, "data_csv": str(ba_cohort), "image_dir": None, "split_seed": 0,
               "cache_dir": str(tmp_path / "cache"), "cache_dtype": "float32", "image_shape": list(shape),
               "embedding_dim": 1}
        path = tmp_path / f"{name}.pt"
        torch.save({"model": model.state_dict(), "config": cfg, "epoch": 0, "age_centre": 50.0}, path)
        results[name] = evaluate.main(["sweep", str(path), "--attribute", "Sex", "--values", "M", "F"])
    hf, im = results["hyperfusion"]["summary"], results["imaging"]["summary"]
    assert [s["value"] for s in hf] == [None, "M", "F"]
    assert hf[2]["mean_pred"] != pytest.approx(hf[1]["mean_pred"], abs=1e-4)      # sex changes the reading
    assert im[2]["mean_pred"] == pytest.approx(im[1]["mean_pred"], abs=1e-4)      # the image-only model ignores it
    assert (tmp_path / "sweep_Sex.md").is_file()


def test_ad_sweep_changes_the_tabular_attribute_of_every_test_row(ad_cohort, tmp_path):
    from models import build_model
    table = data.read_ad_table(ad_cohort)
    train_idx, _, test_idx = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), 0)
    prep = data.TabularPreprocessor().fit([table.raw[i] for i in train_idx])
    torch.manual_seed(0)
    model = build_model("ad", "hyperfusion", n_tabular=prep.n_features)
    cfg = {"task": "ad", "model": "hyperfusion", "data_csv": str(ad_cohort), "image_dir": None, "classes": 3,
           "split_seed": 0, "fold": 0, "crops": None, "cache_dir": str(tmp_path / "cache"), "cache_dtype": "float16",
           "n_tabular": prep.n_features, "tabular_columns": prep.columns, "class_names": NAMES}
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 0, "tabular": prep.state_dict()}, path)
    res = evaluate.sweep(str(path), "abeta", ["200", "1700"])
    assert res["attribute"] == "ABETA" and len(res["rows"]) == 3 and res["rows"][0][1] == len(test_idx)
    p = [np.array(s["mean_probs"]) for s in res["summary"]]
    assert all(np.isclose(q.sum(), 1) for q in p) and not np.allclose(p[1], p[2], atol=1e-6)
    with pytest.raises(data.DataError, match="not a tabular attribute"):
        evaluate.sweep(str(path), "MMSE", ["30"])


def test_select_layers_scores_every_candidate_layer(ba_cohort):
    from models import build_model, candidate_layers
    scores = evaluate.select_layers("brain-age", data_csv=str(ba_cohort), samples=2, draws=2)
    expected = candidate_layers(build_model("brain-age", "imaging", image_shape=data.BRAIN_AGE_SYNTH["shape"]))
    assert sorted(n for n, _ in scores) == sorted(expected)
    assert [h for _, h in scores] == sorted((h for _, h in scores), reverse=True)
