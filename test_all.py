"""The paper's claims about this code, as tests. Run: python -m pytest -q test_all.py"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import HyperConv, HyperLinear, HyperPreactResBlock, init_hyperlayers
from models import AD_MODELS, BRAIN_AGE_MODELS, build_model, count_parameters, layer_loss_entropy

torch.set_num_threads(2)

# small inputs for CPU: brain age needs >= 36 voxels a side for its three conv blocks
BRAIN_AGE_SMALL = (36, 38, 36)
AD_SMALL = (16, 24, 16)


def _randomise(module, seed=0):
    """Random values in every parameter, so no test passes by a lucky zero or a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _per_sample(layer, x, tabular, functional, **kwargs):
    """The naive hypernetwork: one F.linear / F.conv per sample with that sample's generated weights."""
    outs = []
    for b in range(x.shape[0]):
        e = layer.hypernet(tabular[b:b + 1])
        w, bias = layer.hypernet.generate(e)
        outs.append(functional(x[b:b + 1], w.view(layer.weight_shape), bias.view(-1), **kwargs))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------------
# Hyperlayers (Sec. 3.1)

@pytest.mark.parametrize("mode", ["factorised", "materialised"])
@pytest.mark.parametrize("embedding_dim", [1, 3])
def test_hyperlinear_equals_the_per_sample_computation(mode, embedding_dim):
    torch.manual_seed(0)
    layer = _randomise(HyperLinear(37, 11, nn.Sequential(nn.Linear(5, embedding_dim), nn.Tanh()), embedding_dim,
                                   mode=mode))
    x, tabular = torch.randn(6, 37), torch.randn(6, 5)  # every sample has its own tabular vector
    torch.testing.assert_close(layer(x, tabular), _per_sample(layer, x, tabular, F.linear), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["factorised", "materialised"])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0),
                                                   (3, 2, 0), (1, 1, 1)])
def test_hyper_convolution_equals_the_per_sample_computation(mode, dim, kernel, stride, padding):
    torch.manual_seed(dim * 100 + kernel * 10 + stride)
    layer = _randomise(HyperConv(dim, 4, 6, kernel, stride, padding, nn.Linear(5, 2), 2, mode=mode))
    x = torch.randn(5, 4, *[9, 8, 7][:dim])
    tabular = torch.randn(5, 5)
    naive = _per_sample(layer, x, tabular, (F.conv1d, F.conv2d, F.conv3d)[dim - 1], stride=stride, padding=padding)
    torch.testing.assert_close(layer(x, tabular), naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_fn", [
    lambda: HyperLinear(8, 4, nn.Linear(3, 2), 2),
    lambda: HyperConv(3, 2, 3, 3, 1, 1, nn.Linear(3, 2), 2),
    lambda: HyperConv(3, 2, 3, 3, 1, 1, nn.Linear(3, 2), 2, mode="factorised"),
])
def test_gradients_reach_the_embedding_and_both_generators(layer_fn):
    layer = layer_fn()
    x = torch.randn(4, 8) if isinstance(layer, HyperLinear) else torch.randn(4, 2, 5, 5, 5)
    layer(x, torch.randn(4, 3)).square().sum().backward()
    h = layer.hypernet
    for p in [h.embedding.weight, h.weights_gen.weight, h.bias_gen.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_two_tabular_vectors_give_two_outputs_for_the_same_image():
    for model in [build_model("brain-age", "hyperfusion", image_shape=BRAIN_AGE_SMALL),
                  build_model("ad", "hyperfusion", n_tabular=15)]:
        model.eval()
        shape = BRAIN_AGE_SMALL if model.__class__.__name__ == "BrainAgeNet" else AD_SMALL
        image = torch.randn(1, 1, *shape).expand(2, -1, -1, -1, -1)
        n_tab = model.n_tabular
        tabular = torch.eye(2) if n_tab == 2 else torch.randn(2, n_tab)
        _randomise(model)
        out = model(image, tabular)
        assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("relu_follows", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eq1_2_output_variance_matches_input_variance_at_initialisation(kind, relu_follows):
    """Eq. 1-2: with E[e^2] measured on the data, a hyperlayer keeps the variance of a unit-variance
    input (after the ReLU, in the second-moment sense He et al. use, when one follows)."""
    torch.manual_seed(0)
    ratios = []
    for draw in range(10):
        embedding = nn.Sequential(nn.Linear(6, 4), nn.PReLU())
        if kind == "linear":
            layer = HyperLinear(256, 128, embedding, 4, relu_follows=relu_follows)
            x = torch.randn(64, 256)
        else:
            layer = HyperConv(3, 16, 32, 3, 1, 1, embedding, 4, relu_follows=relu_follows)
            x = torch.randn(16, 16, 6, 6, 6)
        tabular = torch.randn(x.shape[0], 6) * 3 + 1  # an embedding whose scale is far from 1
        init_hyperlayers(layer, tabular)
        with torch.no_grad():
            y = layer(x, tabular)
        ratios.append(float(F.relu(y).pow(2).mean() if relu_follows else y.var()) / float(x.var()))
    ratio = sum(ratios) / len(ratios)
    assert 0.5 <= ratio <= 2.0, ratio


def test_init_measures_the_embedding_mean_square_on_training_rows():
    model = build_model("brain-age", "hyperfusion", image_shape=BRAIN_AGE_SMALL)
    sex = torch.eye(2)[torch.randint(0, 2, (50,))]
    measured = init_hyperlayers(model, sex)
    # the sex embedding Linear(2, 1) starts at ones: e = 1 for everyone, E[e^2] = 1, Var(e) = 0
    assert set(measured) == {"linear1", "linear2", "linear3", "final_layer"}
    assert all(abs(v - 1.0) < 1e-6 for v in measured.values())
    g = model.linear1.hypernet.weights_gen.weight.detach()
    bound = (2 / (2 * model.flat_features * 1 * 1.0) * 3) ** 0.5  # Eq. 1 with r = 1, s = 1
    assert float(g.abs().max()) <= bound and float(g.abs().max()) > 0.9 * bound


# ------------------------------------------------------------------------------------------------
# The paper's models (Tables 5-6)

def test_brain_age_parameter_counts_equal_table_5():
    model = build_model("brain-age", "hyperfusion")
    table5 = {"conv1_a": 448, "conv1_b": 6928, "batchnorm1": 32, "conv2_a": 13856, "conv2_b": 27680,
              "batchnorm2": 64, "conv3_a": 55360, "conv3_b": 110656, "batchnorm3": 128, "dropout1": 0,
              "linear1": 1261603, "linear2": 1091, "linear3": 4227, "final_layer": 133}
    assert {n: count_parameters(m) for n, m in model.named_children()} == table5
    assert count_parameters(model) == 1482206
    assert model.flat_features == 39424
    assert count_parameters(build_model("brain-age", "imaging")) == 848673


def test_ad_parameter_counts_equal_table_6():
    model = build_model("ad", "hyperfusion", n_tabular=15)
    table6 = {"conv_bn_relu": 480, "max_pool3d_1": 0, "block1": 42208, "block2": 168384, "block3": 672640,
              "block4": 2953216 + 145, "adaptive_avg_pool3d": 0, "linear_drop1": 0, "fc1": 16448,
              "linear_drop2": 0, "fc2": 195}
    assert {n: count_parameters(m) for n, m in model.named_children()} == table6
    assert count_parameters(model.embedding) == 145  # Linear(15, 8) BatchNorm1d(8) PReLU
    assert count_parameters(model) == 3853716
    assert count_parameters(build_model("ad", "imaging")) == 3589123
    assert count_parameters(build_model("ad", "tabular", n_tabular=15)) == 15 * 8 + 8 + 16 + 1 + 8 * 3 + 3


def _all_models():
    for name in BRAIN_AGE_MODELS:
        yield ("brain-age", name, dict(image_shape=BRAIN_AGE_SMALL))
    yield ("brain-age", "hyperfusion", dict(image_shape=BRAIN_AGE_SMALL, embedding_dim=2))
    for name in AD_MODELS:
        yield ("ad", name, dict(n_tabular=15))
    yield ("ad", "hyperfusion", dict(n_tabular=15, hyperlayers=("conv1", "conv2", "downsample")))


def _inputs(task, model, batch=3):
    torch.manual_seed(1)
    if task == "brain-age":
        return torch.randn(batch, 1, *BRAIN_AGE_SMALL), torch.eye(2)[torch.tensor([0, 1, 1, 0, 1][:batch])]
    return torch.randn(batch, 1, *AD_SMALL), torch.randn(batch, 15)


@pytest.mark.parametrize("task,name,options", list(_all_models()))
def test_every_model_runs_forward_and_backward(task, name, options):
    model = build_model(task, name, **options).to("cpu").train()  # .to() walks every submodule
    image, tabular = _inputs(task, model)
    out = model(image, tabular)
    assert out.shape == ((3,) if task == "brain-age" else (3, 3))
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), \
        [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("task,name,options", list(_all_models()))
def test_in_eval_mode_a_batch_equals_its_samples_one_at_a_time(task, name, options):
    model = _randomise(build_model(task, name, **options)).eval()
    for m in model.modules():  # random but valid running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0)
    image, tabular = _inputs(task, model)
    with torch.no_grad():
        batched = model(image, tabular)
        single = torch.cat([model(image[b:b + 1], tabular[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_hyperfusion_embedding_can_start_from_the_tabular_model():
    tabular_model = _randomise(build_model("ad", "tabular", n_tabular=15))
    model = build_model("ad", "hyperfusion", n_tabular=15)
    model.load_embedding(tabular_model)
    for a, b in zip(model.embedding.state_dict().values(), tabular_model.embedding.state_dict().values()):
        assert torch.equal(a, b)


def test_hyper_block_can_make_any_convolution_a_hyperlayer():
    block = HyperPreactResBlock(8, 16, 2, 0.0, nn.Linear(4, 3), 3, hyperlayers=("conv1", "conv2"))
    names = {n for n, m in block.named_modules() if isinstance(m, HyperConv)}
    assert names == {"conv1", "conv2"}
    assert block(torch.randn(2, 8, 6, 6, 6), torch.randn(2, 4)).shape == (2, 16, 3, 3, 3)


# ------------------------------------------------------------------------------------------------
# Hyperlayer selection (Sec. 3.1.2, App. D)

def test_loss_entropy_ranks_a_layer_the_loss_depends_on_above_one_it_ignores():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, image, tabular):
            return self.used(tabular).squeeze(1)

    batch = (None, torch.randn(16, 4), torch.randn(16))
    scores = dict(layer_loss_entropy(Net(), batch, F.mse_loss, n_draws=30))
    assert scores["unused"] == 0.0 and scores["used"] > 1.0


def test_loss_entropy_scores_every_layer_of_the_ad_backbone():
    model = build_model("ad", "imaging")
    batch = (torch.randn(4, 1, *AD_SMALL), torch.randn(4, 15), torch.tensor([0, 1, 2, 1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = layer_loss_entropy(model, batch, F.cross_entropy, n_draws=5)
    assert len(scores) == 1 + 4 * 3 + 2 and scores[0][1] >= scores[-1][1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


# ------------------------------------------------------------------------------------------------
# Training (Sec. 3.2, 4.2.2, 4.3.6): tiny synthetic cohorts, two epochs

import json
import os
import subprocess
import sys

import numpy as np

import data
import train_ad
import train_brain_age

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def ad_cohort(tmp_path_factory):
    return data.make_synthetic_ad(tmp_path_factory.mktemp("ad"), n=60, seed=0)


@pytest.fixture(scope="session")
def brain_age_cohort(tmp_path_factory):
    return data.make_synthetic_brain_age(tmp_path_factory.mktemp("brain_age"), n=40, seed=0)


def _ad_args(csv_path, out, *extra):
    return ["--data-csv", str(csv_path), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--quiet",
            "--split-seed", "0", "--fold", "1", *extra]


def _run_dir(out, model, fold=1, task="ad"):
    return os.path.join(out, task, model, "seed0", "v0", f"fold{fold}")


def test_a_two_epoch_hyperfusion_run_writes_its_checkpoints_log_and_metrics(ad_cohort, tmp_path):
    metrics = train_ad.main(_ad_args(ad_cohort, tmp_path))
    run = _run_dir(tmp_path, "hyperfusion")
    for f in ["best.pt", "last.pt", "log.csv", "metrics.json", "predictions.npz"]:
        assert os.path.isfile(os.path.join(run, f)), f
    assert os.path.isfile(os.path.join(_run_dir(tmp_path, "tabular"), "best.pt"))  # the pre-trained embedding
    assert not [f for f in os.listdir(run) if f.startswith(".tmp")]
    with open(os.path.join(run, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["test"] == metrics["test"]
    for split in ("val", "test"):
        m = saved[split]
        for k in ("balanced_accuracy", "precision", "f1_macro"):
            assert 0.0 <= m[k] <= 1.0
        assert set(m["tp_rate"]) == {"CN", "MCI", "AD"}
        assert np.array(m["confusion_matrix"]).shape == (3, 3)
    assert sum(map(sum, saved["test"]["confusion_matrix"])) == 12  # subset 4 of 60 subjects
    with open(os.path.join(run, "log.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + 2
    ckpt = train_ad.load_checkpoint(os.path.join(run, "last.pt"))
    assert ckpt["epoch"] == 1 and ckpt["config"]["model"] == "hyperfusion"
    assert data.TabularPreprocessor(state=ckpt["tabular"]).n_features == ckpt["config"]["n_tabular"] == 15


def test_resume_after_an_interruption_ends_as_an_uninterrupted_run(ad_cohort, tmp_path, monkeypatch):
    straight = train_ad.main(_ad_args(ad_cohort, tmp_path / "a", "--model", "concat"))

    real_write_log = train_ad.write_log

    def interrupt_after_first_epoch(history, path):
        real_write_log(history, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_ad, "write_log", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_ad.main(_ad_args(ad_cohort, tmp_path / "b", "--model", "concat"))
    monkeypatch.setattr(train_ad, "write_log", real_write_log)
    assert train_ad.load_checkpoint(os.path.join(_run_dir(tmp_path / "b", "concat"), "last.pt"))["epoch"] == 0
    resumed = train_ad.main(_ad_args(ad_cohort, tmp_path / "b", "--model", "concat", "--resume"))
    assert resumed == straight


def test_the_tabular_model_trains_from_the_table_alone(ad_cohort, tmp_path):
    table_only = tmp_path / "table.csv"
    table_only.write_text(open(ad_cohort).read())  # no images folder next to it
    metrics = train_ad.main(_ad_args(table_only, tmp_path, "--model", "tabular"))
    assert 0.0 <= metrics["test"]["balanced_accuracy"] <= 1.0


def test_a_corrupt_checkpoint_given_to_resume_stops_with_a_clear_error(ad_cohort, tmp_path):
    run = _run_dir(tmp_path, "imaging")
    os.makedirs(run)
    with open(os.path.join(run, "last.pt"), "wb") as f:
        f.write(b"PK\x03\x04 not really a checkpoint")
    p = subprocess.run([sys.executable, "train_ad.py", *_ad_args(ad_cohort, tmp_path, "--model", "imaging",
                                                                 "--resume")],
                       cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "last.pt" in p.stderr and "corrupt" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_checkpoint_of_another_run_is_refused(ad_cohort, tmp_path):
    train_ad.main(_ad_args(ad_cohort, tmp_path, "--model", "tabular"))
    with pytest.raises(data.DataError, match="another run"):
        train_ad.load_checkpoint(os.path.join(_run_dir(tmp_path, "tabular"), "last.pt"),
                                 {"model": "tabular", "fold": 3})


def test_a_two_epoch_brain_age_run_writes_its_files_with_maes_in_years(brain_age_cohort, tmp_path):
    metrics = train_brain_age.main(["--data-csv", str(brain_age_cohort), "--out", str(tmp_path), "--epochs", "2",
                                    "--batch-size", "8", "--quiet"])
    run = os.path.join(tmp_path, "brain-age", "hyperfusion", "v0")
    for f in ["best.pt", "last.pt", "log.csv", "metrics.json", "predictions.npz"]:
        assert os.path.isfile(os.path.join(run, f)), f
    for split in ("val", "test"):
        for k in ("mae", "mae_male", "mae_female"):
            assert 0.0 < metrics[split][k] < 100.0


def test_fig4a_training_sets_are_single_sex_or_a_balanced_mix_of_the_same_size():
    sex = np.array([0] * 30 + [1] * 20)
    idx = np.arange(50)
    m, f = (train_brain_age.select_training_sex(idx, sex, s, 0) for s in ("M", "F"))
    mixed = train_brain_age.select_training_sex(idx, sex, "mixed", 0)
    assert set(sex[m]) == {0} and set(sex[f]) == {1}
    assert len(mixed) == 20 and (sex[mixed] == 0).sum() == 10
