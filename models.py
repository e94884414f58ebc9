"""The paper's models (Sec. 3.5, 4.2.5, 4.3.5; Tables 5-6) and hyperlayer selection (Sec. 3.1.2).

Every model is called as model(image, tabular) and returns (B,) brain ages or (B, C) logits.
build_model(task, name, **options) is the one entry point:
    build_model("brain-age", "hyperfusion")          # Table 5, 1,482,206 parameters
    build_model("ad", "hyperfusion", n_tabular=15)   # Table 6, 3,853,716 parameters
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import HyperLayer, HyperLinear, HyperPreactResBlock, ModulatedPreactResBlock, PreactResBlock

BRAIN_AGE_MODELS = ("imaging", "concat", "hyperfusion")
AD_MODELS = ("imaging", "tabular", "concat", "film", "daft", "hyperfusion")
AD_MODEL_TITLES = {"imaging": "Imaging only", "tabular": "Tabular only", "late-fusion": "Late fusion",  # Table 3
                   "concat": "Concatenation", "film": "FiLM-like", "daft": "DAFT-like", "hyperfusion": "HyperFusion"}


class BrainAgeNet(nn.Module):
    """VGG-like 3D CNN (Levakov et al. 2020) with four linear layers at the end: plain ("imaging"), with the
    one-hot sex concatenated to each one's input ("concat", Sec. 4.2.5), or HyperLinear layers, each with its own
    embedding Linear(2, embedding_dim) of the sex ("hyperfusion", Sec. 3.5.1, Fig. 2D)."""

    def __init__(self, name="hyperfusion", image_shape=(90, 120, 99), embedding_dim=1, n_tabular=2,
                 hyper_mode="factorised"):
        super().__init__()
        assert name in BRAIN_AGE_MODELS, name
        self.name, self.n_tabular = name, n_tabular
        chans = [1, 16, 32, 64]
        for i in range(3):
            setattr(self, f"conv{i + 1}_a", nn.Conv3d(chans[i], chans[i + 1], 3))
            setattr(self, f"conv{i + 1}_b", nn.Conv3d(chans[i + 1], chans[i + 1], 3))
            setattr(self, f"batchnorm{i + 1}", nn.BatchNorm3d(chans[i + 1]))
        self.dropout1 = nn.Dropout3d(0.2)
        spatial = list(image_shape)
        for _ in range(3):  # two unpadded 3x3x3 convolutions, then a 2x max-pool
            spatial = [(s - 4) // 2 for s in spatial]
        assert min(spatial) > 0, f"image shape {tuple(image_shape)} is too small for three conv blocks"
        self.flat_features = 64 * math.prod(spatial)  # 64*7*11*8 = 39424 at 90x120x99

        self.linears = ["linear1", "linear2", "linear3", "final_layer"]
        sizes = [self.flat_features, 16, 32, 64, 1]
        for n, fin, fout in zip(self.linears, sizes, sizes[1:]):
            if name != "hyperfusion":
                layer = nn.Linear(fin + (n_tabular if name == "concat" else 0), fout)
            else:
                # The embedding starts at ones (our choice): both sexes start from shared weights, not (random
                # init, c = 0 in Eq. 1-2) often from each other's negatives: test MAE 3.90 and 3.68 against 4.97
                # and 4.53 (RESULTS.md, "Brain age on the synthetic cohort").
                embedding = nn.Linear(n_tabular, embedding_dim)
                nn.init.ones_(embedding.weight)
                nn.init.zeros_(embedding.bias)
                layer = HyperLinear(fin, fout, embedding, embedding_dim, relu_follows=n != "final_layer",
                                    mode=hyper_mode)
            setattr(self, n, layer)

    def forward(self, image, tabular):  # image (B, 1, D, H, W), tabular (B, 2) one-hot sex
        x = image
        for i in range(1, 4):
            x = F.relu(getattr(self, f"conv{i}_a")(x))
            x = F.relu(getattr(self, f"conv{i}_b")(x))
            x = getattr(self, f"batchnorm{i}")(F.max_pool3d(x, 2))
        x = self.dropout1(x).flatten(1)                   # (B, 39424)
        for n in self.linears[:-1]:
            x = F.relu(self.linear(n, x, tabular))
        # the age itself in float32: bfloat16 would round it to 1/8 year 16-32 years from the centre, 1/4 beyond
        with torch.autocast(x.device.type, enabled=False):
            x = self.linear(self.linears[-1], x.float(), tabular.float())
        return x.squeeze(1)                               # (B,)

    def linear(self, name, x, tabular):
        layer = getattr(self, name)
        if self.name == "hyperfusion":
            return layer(x, tabular)
        return layer(torch.cat([x, tabular], 1) if self.name == "concat" else x)


@dataclass(frozen=True)
class AgeTarget:
    """What BrainAgeNet regresses: (age - centre) / scale, centred on the training mean (Eq. 4); scale 1 scored
    3.81 MAE against 4.17 for 10 over three versions (RESULTS.md, "Brain age on the synthetic cohort")."""
    centre: float
    scale: float = 1.0

    def decay(self, weight_decay):
        """Adam's L2 term (Eq. 3) on this target that means `weight_decay` (Table 1's lambda) on ages in years."""
        return weight_decay / self.scale ** 2

    def encode(self, age):
        return (age - self.centre) / self.scale

    def decode(self, output):
        return output * self.scale + self.centre


class TabularMLP(nn.Module):
    """Tabular-only model, Linear(n_tab, 8) BatchNorm1d(8) PReLU Linear(8, C) (Fig. 3C). Its first
    three modules are the HyperFusion embedding, pre-trained on the same split and fold (Sec. 4.3.6)."""

    def __init__(self, n_tabular=15, n_classes=3, hidden=8):
        super().__init__()
        self.embedding = tabular_embedding(n_tabular, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, image, tabular):  # the image is ignored
        return self.head(self.embedding(tabular))


def tabular_embedding(n_tabular, hidden=8):
    return nn.Sequential(nn.Linear(n_tabular, hidden), nn.BatchNorm1d(hidden), nn.PReLU())


class ADNet(nn.Module):
    """Pre-activation ResNet on one hippocampus crop, f = 16 (Fig. 3B); block4 is plain ("imaging", "concat": the
    table also into fc1), modulated ("film", "daft") or the HyperRes block ("hyperfusion")."""

    def __init__(self, name="hyperfusion", n_tabular=15, n_classes=3, f=16, hyperlayers=("downsample",),
                 embedding_dim=8, hyper_mode="materialised"):
        super().__init__()
        assert name in AD_MODELS and name != "tabular", name
        self.name, self.n_tabular = name, n_tabular
        self.conv_bn_relu = nn.Sequential(nn.Conv3d(1, f, 3, padding=1), nn.BatchNorm3d(f, momentum=0.05), nn.ReLU())
        self.max_pool3d_1 = nn.MaxPool3d(2)
        self.block1 = PreactResBlock(f, 2 * f, 1, 0.1)
        self.block2 = PreactResBlock(2 * f, 4 * f, 2, 0.2)
        self.block3 = PreactResBlock(4 * f, 8 * f, 2, 0.2)
        if name == "hyperfusion":
            self.block4 = HyperPreactResBlock(8 * f, 16 * f, 2, 0.3, tabular_embedding(n_tabular, embedding_dim),
                                              embedding_dim, hyperlayers, hyper_mode)
        elif name in ("film", "daft"):
            self.block4 = ModulatedPreactResBlock(8 * f, 16 * f, 2, 0.3, n_tabular, name)
        else:
            self.block4 = PreactResBlock(8 * f, 16 * f, 2, 0.3)
        self.adaptive_avg_pool3d = nn.AdaptiveAvgPool3d(1)
        self.linear_drop1 = nn.Dropout(0.6)
        self.fc1 = nn.Linear(16 * f + (n_tabular if name == "concat" else 0), 4 * f)
        self.linear_drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(4 * f, n_classes)

    @property
    def embedding(self):
        """The HyperFusion tabular embedding (shared by the block's hyperlayers)."""
        return next(m for m in self.block4.modules() if isinstance(m, HyperLayer)).hypernet.embedding

    def load_embedding(self, tabular_model):
        """Start the embedding from a trained TabularMLP's first three modules (Sec. 4.3.6)."""
        self.embedding.load_state_dict(tabular_model.embedding.state_dict())

    def forward(self, image, tabular):  # image (B, 1, D, H, W), tabular (B, n_tab)
        x = self.max_pool3d_1(self.conv_bn_relu(image))
        x = self.block3(self.block2(self.block1(x)))
        x = self.block4(x, tabular)
        x = self.linear_drop1(self.adaptive_avg_pool3d(x).flatten(1))         # (B, 16f)
        if self.name == "concat":                          # the record joins after the dropout, never dropped
            x = torch.cat([x, tabular], 1)                 # (B, 16f + n_tab)
        x = F.relu(self.fc1(x))
        return self.fc2(self.linear_drop2(x))              # (B, C) logits


def class_probabilities(logits, temperature=1.0):
    """(B, C) logits -> probabilities; T != 1 is temperature scaling (Guo et al. 2017), the same argmax."""
    return F.softmax(logits / temperature if temperature != 1.0 else logits, 1)


def build_model(task, name, image_shape=None, n_tabular=None, n_classes=3, embedding_dim=None, **options):
    """Every model of Tables 5-6 by task ("brain-age" or "ad") and name; defaults are the paper's sizes."""
    if task == "brain-age":
        return BrainAgeNet(name, image_shape or (90, 120, 99), embedding_dim or 1, n_tabular or 2, **options)
    if task == "ad":
        if name == "tabular":
            return TabularMLP(n_tabular or 15, n_classes)
        return ADNet(name, n_tabular or 15, n_classes, embedding_dim=embedding_dim or 8, **options)
    raise ValueError(f"unknown task {task!r}: expected 'brain-age' or 'ad'")


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def candidate_layers(model):
    """Names of the layers that could become hyperlayers: every convolution and linear layer."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.Linear)) and n]


@torch.no_grad()
def layer_loss_entropy(model, batch, loss_fn, names=None, n_draws=100, bins=10, seed=0, on_draw=None):
    """Sec. 3.1.2: each candidate layer of an untrained backbone re-initialised alone n_draws times, scored by the
    entropy of the histogram of its losses on one batch over one range shared by all layers (so scores compare)
    -> [(name, entropy)] from most to least influential; on_draw() after each draw."""
    image, tabular, target = batch
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    losses = {}
    for name in names or candidate_layers(model):
        layer = model.get_submodule(name)
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        draws = []
        for _ in range(n_draws):
            layer.reset_parameters()
            draws.append(float(loss_fn(model(image, tabular), target)))
            if on_draw is not None:
                on_draw()
        layer.load_state_dict(saved)
        losses[name] = torch.tensor(draws)
    everything = torch.cat(list(losses.values()))
    lo, hi = float(everything.min()), float(everything.max())
    scores = []
    for name, l in losses.items():
        p = torch.histc(l, bins=bins, min=lo, max=hi if hi > lo else lo + 1) / len(l)
        p = p[p > 0]
        scores.append((name, float(-(p * p.log()).sum())))
    model.train(was_training)
    return sorted(scores, key=lambda s: -s[1])
