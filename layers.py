"""HyperFusion's layers: hypernetworks, hyperlayers and the residual blocks (Sec. 3.1, 3.5.2).

This file imports nothing but torch, so it can be copied into another project as it is.

A hyperlayer is a primary-network layer whose weights and bias are not parameters of its own:
a hypernetwork generates them, per sample, from the sample's tabular record (Sec. 3.1, Fig. 1):

    e = embedding(t)                  # Sec. 3.1.1, (B, k)
    W = weights_gen(e) = G_w e + c_w  # (B, out, in, *kernel)
    b = bias_gen(e)    = G_b e + c_b  # (B, out)

Only the embedding and the two generators are trained (Eq. 3); W and b are recomputed every call.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Initialisation (Sec. 3.1.3, Eq. 1-2), after the hyperfan-in of Chang et al. (2020)

def hyperfan_in_variances(fan_in, embedding_dim, embedding_sq_mean, relu_follows, has_bias):
    """Variances of the generators G_w, G_b that keep a hyperlayer's output variance equal to its input variance at
    initialisation. fan_in: d_j, the primary layer's fan-in (in_features, or in_channels * prod(kernel)).
    embedding_dim: d_k. embedding_sq_mean: E[e^2] of the generator input over the training set; the mean square
    equals Var(e) for a zero-mean e and stays right for a constant e (the sex embedding of a one-hot vector through
    a Linear(2, 1) at ones). r = relu_follows, s = has_bias."""
    r, s = int(relu_follows), int(has_bias)
    var_w = 2 ** r / (2 ** s * fan_in * embedding_dim * embedding_sq_mean)  # Eq. 1
    var_b = 2 ** r / (2 * embedding_dim * embedding_sq_mean)                 # Eq. 2
    return var_w, var_b


class HyperNetwork(nn.Module):
    """One hyperlayer's hypernetwork: an embedding of the tabular record, then a weights generator
    and a bias generator, both linear in the embedding (Sec. 3.1.1, Fig. 1B)."""

    def __init__(self, embedding, embedding_dim, n_weights, n_biases):
        super().__init__()
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.embedding_dim = embedding_dim
        self.weights_gen = nn.Linear(embedding_dim, n_weights)
        self.bias_gen = nn.Linear(embedding_dim, n_biases) if n_biases else None

    def forward(self, tabular):
        return self.embedding(tabular)  # (B, k)

    def generate(self, e):
        """Per-sample weights (B, n_weights) and biases (B, n_biases) or None."""
        return self.weights_gen(e), self.bias(e)

    def bias(self, e):
        return self.bias_gen(e) if self.bias_gen is not None else None


class HyperLayer(nn.Module):
    """What every hyperlayer shares: its hypernetwork and the Eq. 1-2 initialisation.

    relu_follows is the r of Eq. 1-2: whether a ReLU comes right after this layer.
    mode: "factorised" never builds per-sample weights: since W(e) = sum_k e_k A_k + C is linear in e,
    x W(e)^T = sum_k e_k (x A_k^T) + x C^T, i.e. one ordinary layer with (k+1)*out outputs mixed by e.
    "materialised" builds W (B, out, in, ...) and applies it with one batched call. Both are exact;
    bench.py measures which is faster where."""

    def __init__(self, fan_in, weight_shape, out_features, embedding, embedding_dim, bias, relu_follows,
                 mode):
        super().__init__()
        assert mode in ("factorised", "materialised"), mode
        self.fan_in, self.weight_shape, self.out_features = fan_in, tuple(weight_shape), out_features
        self.relu_follows, self.mode = relu_follows, mode
        self.hypernet = HyperNetwork(embedding, embedding_dim, math.prod(self.weight_shape),
                                     out_features if bias else 0)
        self.reset_generators(1.0)

    @torch.no_grad()
    def reset_generators(self, embedding_sq_mean):
        """Eq. 1-2: G ~ U(-sqrt(3 Var), +sqrt(3 Var)), c = 0."""
        h = self.hypernet
        var_w, var_b = hyperfan_in_variances(self.fan_in, h.embedding_dim, max(float(embedding_sq_mean), 1e-12),
                                             self.relu_follows, h.bias_gen is not None)
        for gen, var in ((h.weights_gen, var_w), (h.bias_gen, var_b)):
            if gen is not None:
                gen.weight.uniform_(-math.sqrt(3 * var), math.sqrt(3 * var))
                gen.bias.zero_()

    def factorised_weight(self):
        """[A_1; ...; A_k; C] stacked along the output axis: ((k+1)*out, in, *kernel)."""
        g, k = self.hypernet.weights_gen, self.hypernet.embedding_dim
        a = g.weight.t().reshape(k, *self.weight_shape)          # (k, out, in, *kernel)
        c = g.bias.reshape(1, *self.weight_shape)                 # (1, out, in, *kernel)
        return torch.cat([a, c]).flatten(0, 1)

    def mix(self, z, e):
        """z (B, (k+1)*out, *S) from the factorised weight -> sum_k e_k z_k + z_C: (B, out, *S)."""
        B, k = e.shape
        z = z.unflatten(1, (k + 1, self.out_features))           # (B, k+1, out, *S)
        e = e.reshape(B, k, *([1] * (z.dim() - 2)))
        return (z[:, :k] * e).sum(1) + z[:, k]

    def add_bias(self, y, b):
        return y if b is None else y + b.reshape(*b.shape, *([1] * (y.dim() - 2)))


class HyperLinear(HyperLayer):
    """A linear layer whose weights (out, in) and bias (out,) are generated per sample (Sec. 3.1)."""

    def __init__(self, in_features, out_features, embedding=None, embedding_dim=None, bias=True,
                 relu_follows=False, mode="factorised"):
        self.in_features = in_features
        super().__init__(in_features, (out_features, in_features), out_features, embedding, embedding_dim,
                         bias, relu_follows, mode)

    def forward(self, x, tabular):  # x (B, in), tabular (B, n_tab)
        e = self.hypernet(tabular)                                               # (B, k)
        if self.mode == "factorised":
            return self.add_bias(self.mix(F.linear(x, self.factorised_weight()), e), self.hypernet.bias(e))
        w, b = self.hypernet.generate(e)
        y = torch.bmm(w.view(-1, *self.weight_shape), x.unsqueeze(-1)).squeeze(-1)  # (B, out, in) @ x: (B, out)
        return self.add_bias(y, b)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class HyperConv(HyperLayer):
    """A 1D, 2D or 3D convolution whose kernel and bias are generated per sample (Sec. 3.1)."""

    def __init__(self, dim, in_channels, out_channels, kernel_size, stride=1, padding=0, embedding=None,
                 embedding_dim=None, bias=True, relu_follows=False, mode="materialised"):
        tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dim
        self.dim, self.in_channels = dim, in_channels
        self.kernel_size, self.stride, self.padding = tup(kernel_size), tup(stride), tup(padding)
        super().__init__(in_channels * math.prod(self.kernel_size), (out_channels, in_channels, *self.kernel_size),
                         out_channels, embedding, embedding_dim, bias, relu_follows, mode)
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]

    def forward(self, x, tabular):  # x (B, C_in, *S), tabular (B, n_tab)
        e = self.hypernet(tabular)                                               # (B, k)
        B = x.shape[0]
        if self.mode == "factorised":
            z = self.conv(x, self.factorised_weight(), None, self.stride, self.padding)  # (B, (k+1)*out, *S')
            return self.add_bias(self.mix(z, e), self.hypernet.bias(e))          # (B, out, *S')
        w, b = self.hypernet.generate(e)
        w = w.view(B, *self.weight_shape)                                        # (B, out, in, *kernel)
        if all(k == 1 for k in self.kernel_size) and not any(self.padding):
            # a pointwise kernel is a per-sample matrix product over the (strided) positions
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
            y = torch.bmm(w.view(B, self.out_features, self.in_channels), x.flatten(2))  # (B, out, P)
            y = y.view(B, self.out_features, *x.shape[2:])                       # (B, out, *S')
        else:
            # one grouped convolution: sample b's channels form group b
            y = self.conv(x.reshape(1, B * self.in_channels, *x.shape[2:]), w.flatten(0, 1), None,
                          self.stride, self.padding, 1, B)                       # (1, B*out, *S')
            y = y.view(B, self.out_features, *y.shape[2:])                       # (B, out, *S')
        return self.add_bias(y, b)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_features}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, mode={self.mode}")


def HyperConv3d(in_channels, out_channels, kernel_size, stride=1, padding=0, embedding=None, embedding_dim=None,
                **kwargs):
    """The 3D hyper convolution used by the AD model (Sec. 3.5.2)."""
    return HyperConv(3, in_channels, out_channels, kernel_size, stride, padding, embedding, embedding_dim, **kwargs)


@torch.no_grad()
def init_hyperlayers(model, tabular):
    """Eq. 1-2 for every hyperlayer of `model`, with E[e^2] measured once on the training set's
    tabular rows (Sec. 3.1.3). The embeddings run as in training (train-mode batch norm) on copies,
    so the model's own running statistics are left untouched. Returns {layer name: E[e^2]}."""
    measured = {}
    for name, layer in model.named_modules():
        if isinstance(layer, HyperLayer):
            embedding = copy.deepcopy(layer.hypernet.embedding).train()
            e = embedding(tabular.to(next(layer.parameters()).device))
            measured[name] = float(e.pow(2).mean())
            layer.reset_generators(measured[name])
    return measured


# ----------------------------------------------------------------------------------------------
# Residual blocks of the AD network (Sec. 3.5.2, Fig. 3D)

def _bn(channels):
    return nn.BatchNorm3d(channels, momentum=0.05)


class PreactResBlock(nn.Module):
    """BN ReLU Dropout3d Conv3d(3, stride) BN ReLU Dropout3d Conv3d(3), plus the identity or, when the stride or the
    width changes, a downsample BN Conv3d(1x1, stride) (He et al. 2016). Any of conv1, conv2 and the downsample
    convolution named in `hyperlayers` is a HyperConv3d reading `embedding` (one module, shared); a hyper downsample
    is HyperConv3d(1x1, stride) followed by BN."""

    def __init__(self, in_channels, out_channels, stride=1, dropout=0.0, embedding=None, embedding_dim=None,
                 hyperlayers=(), mode="materialised"):
        super().__init__()
        unknown = set(hyperlayers) - {"conv1", "conv2", "downsample"}
        assert not unknown, f"unknown hyperlayers {unknown}"
        conv = lambda name, c_in, k, s, p: (
            HyperConv3d(c_in, out_channels, k, s, p, embedding, embedding_dim, mode=mode) if name in hyperlayers
            else nn.Conv3d(c_in, out_channels, k, s, p))
        self.bn1, self.bn2 = _bn(in_channels), _bn(out_channels)
        self.conv1 = conv("conv1", in_channels, 3, stride, 1)
        self.conv2 = conv("conv2", out_channels, 3, 1, 1)
        self.dropout = nn.Dropout3d(dropout)
        self.downsample = None
        if "downsample" in hyperlayers:
            self.downsample = conv("downsample", in_channels, 1, stride, 0)
            self.downsample_bn = _bn(out_channels)
        elif stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(_bn(in_channels), nn.Conv3d(in_channels, out_channels, 1, stride))

    @staticmethod
    def _call(layer, x, tabular):
        return layer(x, tabular) if isinstance(layer, HyperLayer) else layer(x)

    def residual(self, x, tabular=None):  # (B, C_in, D, H, W) -> (B, C_out, D', H', W')
        h = self._call(self.conv1, self.dropout(F.relu(self.bn1(x))), tabular)
        return self._call(self.conv2, self.dropout(F.relu(self.bn2(h))), tabular)

    def shortcut(self, x, tabular=None):
        if self.downsample is None:
            return x
        if isinstance(self.downsample, HyperLayer):
            return self.downsample_bn(self.downsample(x, tabular))
        return self.downsample(x)

    def forward(self, x, tabular=None):
        return self.residual(x, tabular) + self.shortcut(x, tabular)


class HyperPreactResBlock(PreactResBlock):
    """The HyperRes block (Sec. 3.5.2, Fig. 3D): the pre-activation block with hyperlayers; the paper's
    choice (App. D.2) is the downsample convolution alone."""

    def __init__(self, in_channels, out_channels, stride, dropout, embedding, embedding_dim,
                 hyperlayers=("downsample",), mode="materialised"):
        super().__init__(in_channels, out_channels, stride, dropout, embedding, embedding_dim, hyperlayers, mode)


class ModulatedPreactResBlock(PreactResBlock):
    """FiLM-like and DAFT-like blocks (Sec. 4.3.5; Perez et al. 2018, Wolf et al. 2022).

    The residual branch reads scale * F + shift instead of the block input F, per channel, with
    (scale, shift) = split(aux(z)) and no activation on the scale; the downsample shortcut reads F.
    FiLM: z = tabular. DAFT: z = concat(global average pool of F, tabular)."""

    def __init__(self, in_channels, out_channels, stride, dropout, n_tabular, method="daft", hidden=7):
        super().__init__(in_channels, out_channels, stride, dropout)
        assert method in ("film", "daft"), method
        self.method = method
        z_dim = n_tabular + (in_channels if method == "daft" else 0)
        self.aux = nn.Sequential(nn.Linear(z_dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, 2 * in_channels, bias=False))

    def forward(self, x, tabular):  # x (B, C, D, H, W)
        z = tabular if self.method == "film" else torch.cat([x.mean((2, 3, 4)), tabular], 1)
        scale, shift = self.aux(z)[:, :, None, None, None].chunk(2, dim=1)   # (B, C, 1, 1, 1) each
        return self.residual(scale * x + shift) + self.shortcut(x)
