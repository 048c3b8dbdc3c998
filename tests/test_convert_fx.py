"""dualflow.convert on real architectures (torch.fx over the op table).

The models below follow the structure of torchvision's ResNet-18 (BasicBlock), ResNet-50
(Bottleneck with stride-2 downsample branches), MobileNetV2 (inverted residuals, depthwise
convolutions, ReLU6), DenseNet (a dense block: concatenation) and an MLP-Mixer, at reduced
width (torchvision is not a dependency). For each: with zero weight variances the converted
model is the original function (outputs and gradients in float64, Theorem 2(3)); with
weight variances its output moments match weight-sampling Monte Carlo within the measured
approximation error of moment propagation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualflow as df
from dualflow import ops

D = torch.float64

# ============================================================================ the architectures


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7x7/2 stem, 3x3/2 max pool, four stages, global pool, fc."""

    def __init__(self, block, layers, width=8, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, width, layers[0])
        self.layer2 = self._make(block, width * 2, layers[1], 2)
        self.layer3 = self._make(block, width * 4, layers[2], 2)
        self.layer4 = self._make(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make(self, block, planes, blocks, stride=1):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(width=8, num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], width, num_classes)


def resnet50(width=4, num_classes=10):
    return ResNet(Bottleneck, [3, 4, 6, 3], width, num_classes)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        cfg = [(1, width, 1, 1), (6, width * 2, 2, 2), (6, width * 3, 2, 2), (6, width * 4, 1, 1)]
        layers = [ConvBNReLU(3, width, stride=2)]
        cin = width
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBNReLU(cin, width * 8, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(width * 8, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1)).reshape(x.shape[0], -1)
        return self.classifier(x)


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        prev = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(prev))))))


class DenseNetBlock(nn.Module):
    """torchvision's dense block (each layer sees the concatenation of all earlier ones),
    a transition (BN, ReLU, 1x1 conv, 2x2 average pool) and a classifier head."""

    def __init__(self, cin=8, growth=4, layers=3, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, 1, 1, bias=False)
        self.denselayers = nn.ModuleList([DenseLayer(cin + i * growth, growth) for i in range(layers)])
        c = cin + layers * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)
        )
        self.norm = nn.BatchNorm2d(c // 2)
        self.fc = nn.Linear(c // 2, num_classes)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.denselayers:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = F.relu(self.norm(x))
        return self.fc(x.mean(dim=(2, 3)))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_hidden, channel_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    def __init__(self, image=16, patch=4, dim=16, depth=2, num_classes=10):
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, 2 * tokens, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).permute(0, 2, 1)  # (B, tokens, dim)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


ARCHS = {
    "resnet18": (resnet18, 32),
    "resnet50": (resnet50, 32),
    "mobilenet_v2": (MobileNetV2, 32),
    "densenet_block": (DenseNetBlock, 16),
    "mlp_mixer": (MLPMixer, 16),
}


def make(name: str) -> tuple[nn.Module, int]:
    """The model in float64 and eval mode, with non-trivial BatchNorm statistics and affines."""
    build, size = ARCHS[name]
    torch.manual_seed(0)
    model = build().to(D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(c, dtype=D, generator=g))
                mod.running_var.copy_(1 + 0.2 * torch.rand(c, dtype=D, generator=g))
                mod.weight.copy_(1 + 0.1 * torch.randn(c, dtype=D, generator=g))
                mod.bias.copy_(0.1 * torch.randn(c, dtype=D, generator=g))
    return model.eval(), size


# ============================================================================ Theorem 2(3)


@pytest.mark.parametrize("name", list(ARCHS))
def test_zero_variance_model_is_the_original_function(name):
    """Weight variances 0: outputs, input gradients and weight gradients equal the original's
    in float64 to 1e-10 (and the point conversion gives plain tensors)."""
    model, size = make(name)
    conv = df.convert(model, weight_var=0.0).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, size, size, dtype=D, generator=g)
    w = torch.randn(3, 10, dtype=D, generator=g)

    xr = x.clone().requires_grad_()
    ref = model(xr)
    (ref * w).sum().backward()
    xc = x.clone().requires_grad_()
    out = conv(xc)
    assert isinstance(out, df.Gaussian)
    (out.mean * w).sum().backward()
    assert float((out.mean - ref).abs().max()) < 1e-10
    assert float(out.var.abs().max()) < 1e-10
    assert float((xc.grad - xr.grad).abs().max()) < 1e-10
    layers = {p: m for p, m in conv.named_modules() if isinstance(m, df.nn.BayesLayer)}
    assert layers
    for path, layer in layers.items():
        torch.testing.assert_close(
            layer.weight_mu.grad, model.get_parameter(f"{path}.weight").grad, atol=1e-10, rtol=0
        )

    point = df.convert(model, bayes=False).eval()
    out = point(x)
    assert isinstance(out, torch.Tensor)
    assert float((out - model(x)).abs().max()) < 1e-10


# ============================================================================ moments vs MC


def weight_sampling_mc(model, conv, x, samples, g):
    """Outputs of the original model with weights drawn from the converted model's q."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    outs = []
    try:
        for _ in range(samples):
            new = dict(saved)
            for path, mod in conv.named_modules():
                if isinstance(mod, df.nn.BayesLayer):
                    eps = torch.randn(mod.weight_mu.shape, dtype=D, generator=g)
                    new[f"{path}.weight"] = mod.weight_mu + mod.weight_var.sqrt() * eps
                    if mod.bias_mu is not None:
                        eps = torch.randn(mod.bias_mu.shape, dtype=D, generator=g)
                        new[f"{path}.bias"] = mod.bias_mu + mod.bias_var.sqrt() * eps
            model.load_state_dict(new)
            with torch.no_grad():
                outs.append(model(x))
    finally:
        model.load_state_dict(saved)
    return torch.stack(outs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_output_moments_match_weight_sampling(name):
    """With Gaussian weights (the layers' initial variance rule, init_var_ratio=0.01) the output
    moments match weight-sampling Monte Carlo within the approximation error of moment
    propagation (mean-field independence of units and of residual/concatenated branches,
    Clark's maxima, LayerNorm to first order), measured on these five models: means within
    0.15 sd of the output noise, variances within a factor 0.65-1.2 (mostly 0.85-1.05)."""
    model, size = make(name)
    conv = df.convert(model, init_var_ratio=0.01).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, dtype=D, generator=g)
    with torch.no_grad():
        out = conv(x)
    s = 300
    mc = weight_sampling_mc(model, conv, x, s, g)
    mm, mv = mc.mean(0), mc.var(0)
    se_m = (mv / s).sqrt()
    assert bool(((out.mean - mm).abs() <= 0.35 * mv.sqrt() + 3 * se_m).all())
    ratio = out.var / mv  # the MC variance itself has ~8% relative error at s = 300
    assert 0.6 < float(ratio.min()) and float(ratio.max()) < 1.5, (float(ratio.min()), float(ratio.max()))
    assert 0.8 < float(ratio.median()) < 1.15


# ============================================================================ errors


class Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.sort(self.fc(x), dim=1).values
        return torch.cumsum(h, 1)


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            return h
        return -h


def test_unsupported_ops_raise_one_error_naming_node_op_and_line():
    with pytest.raises(ops.UnsupportedOpError) as err:
        df.convert(Sorts())
    msg = str(err.value)
    assert "3 operation(s)" in msg  # sort, .values of its result, cumsum
    assert "node 'sort': function torch.sort" in msg
    assert "node 'cumsum': function torch.cumsum" in msg and "attribute .values" in msg
    assert "test_convert_fx.py" in msg and "h = torch.sort(self.fc(x), dim=1).values" in msg
    assert "return torch.cumsum(h, 1)" in msg


def test_data_dependent_control_flow_raises_with_its_line():
    with pytest.raises(
        ops.UnsupportedOpError,
        match=r"control flow.*test_convert_fx\.py:\d+ in forward: `if h\.sum\(\) > 0:`",
    ):
        df.convert(Branches())


def test_unsupported_module_and_settings_are_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1)
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.conv(self.pool(self.attn(x, x, x)[0]))

    with pytest.raises(
        ops.UnsupportedOpError, match=r"(?s)3 operation.*MultiheadAttention.*ceil_mode.*reflect"
    ):
        df.convert(M())


def test_nothing_is_treated_as_deterministic_silently():
    """A division by an activation has no rule: refused at conversion, not run as a constant."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x) / self.b(x)

    with pytest.raises(ops.UnsupportedOpError, match="division by an activation"):
        df.convert(M())


# ============================================================================ the pooling rewrite


class ReluPool(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.functional = functional

    def forward(self, x):
        if self.functional:
            return F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.pool(self.act(self.conv(x)))


@pytest.mark.parametrize("functional", [False, True])
def test_pool_before_monotone_activation(functional):
    """maxpool(relu(z)) becomes relu(maxpool(z)): the same function, more accurate moments."""
    torch.manual_seed(0)
    model = ReluPool(functional).to(D)
    conv = df.convert(model, init_var_ratio=0.2)
    plain = df.convert(model, init_var_ratio=0.2, pool_rewrite=False)
    plain.load_state_dict(conv.state_dict())
    order = [st["target"] for st in conv.steps if st["op"] in ("call", "call_module")]
    assert order[1:] == (["max_pool2d", "relu"] if functional else ["pool", "act"])
    x = torch.randn(2, 2, 6, 6, dtype=D)
    torch.testing.assert_close(df.convert(model, bayes=False)(x), model(x))
    g = torch.Generator().manual_seed(4)
    mc = weight_sampling_mc(model, conv, x, 4000, g)
    mm, mv = mc.mean(0), mc.var(0)
    with torch.no_grad():
        a, b = conv(x), plain(x)
    err_rewrite = float(((a.var - mv).abs() / mv).median())
    err_plain = float(((b.var - mv).abs() / mv).median())
    assert err_rewrite < 0.6 * err_plain, (err_rewrite, err_plain)
    assert float(((a.mean - mm).abs() / mv.sqrt()).median()) < 0.05


def test_pool_rewrite_skips_non_monotone_activations():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.GELU()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.act(x))

    conv = df.convert(M())
    assert [st["target"] for st in conv.steps if st["op"] == "call_module"] == ["act", "pool"]


# ============================================================================ weights and training


def test_weight_variances_mapping_and_checks():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    var = {"0.weight": torch.full((4, 3), 0.01), "2.bias": 0.5}
    conv = df.convert(model, weight_var=var)
    torch.testing.assert_close(conv.get_submodule("0").weight_var, torch.full((4, 3), 0.01))
    torch.testing.assert_close(conv.get_submodule("2").bias_var, torch.full((2,), 0.5))
    torch.testing.assert_close(conv.get_submodule("0").weight_mu, model[0].weight)
    assert conv.source_names["2.bias_rho"] == "2.bias"
    with pytest.raises(ValueError, match="no parameter"):
        df.convert(model, weight_var={"0.wieght": 0.1})
    with pytest.raises(ValueError, match="bayes=True"):
        df.convert(model, bayes=False, weight_var=0.1)
    with pytest.raises(ValueError, match="finite"):
        df.convert(model, weight_var=-1.0)


def test_bare_layer_and_sequential_convert():
    lin = nn.Linear(3, 2)
    conv = df.convert(lin, weight_var={"weight": 0.0, "bias": 0.0})
    x = torch.randn(4, 3)
    torch.testing.assert_close(conv(x).mean, lin(x))
    assert conv.source_names["module.weight_mu"] == "weight"
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    torch.testing.assert_close(
        df.convert(seq, bayes=False)(torch.randn(2, 1, 4, 4)).shape, torch.Size([2, 3])
    )


def test_inputs_are_validated_once():
    conv = df.convert(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        conv(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="negative"):
        conv(df.Gaussian(torch.zeros(1, 2), -torch.ones(1, 2)))


def _cifar_subset(root, n_train, n_test):
    z = np.load(root / "cifar10_jpeg_q75" / "train_first4000_exact.npz")
    x = torch.tensor(z["x"]).permute(0, 3, 1, 2).float() / 255.0
    mean, std = x[:n_train].mean((0, 2, 3), keepdim=True), x[:n_train].std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.tensor(z["y"])
    return (x[:n_train], y[:n_train]), (x[-n_test:], y[-n_test:])


@pytest.mark.slow
def test_converted_resnet18_trains_by_bp_on_cifar10(data_root):
    """A converted ResNet-18-style model (width 8) trained by ``bp`` on 2000 CIFAR-10 images
    beats the constant predictor on 1000 held-out ones (accuracy and NLL)."""
    from dualflow import methods
    from dualflow.train import TrainConfig

    (xtr, ytr), (xte, yte) = _cifar_subset(data_root, 2000, 1000)
    torch.manual_seed(0)
    model = resnet18(width=8)
    method = methods.create(
        "bp", lambda bayes, dropout=0.0: df.convert(model, bayes=bayes), task="classification"
    )
    method.fit((xtr, ytr), TrainConfig(epochs=4, batch_size=64, lr=3e-3, progress=False, seed=0))
    res = method.evaluate(xte, yte)
    prior = torch.bincount(ytr, minlength=10).float() / len(ytr)
    constant_nll = float(-torch.log(prior[yte]).mean())
    constant_acc = float((yte == prior.argmax()).float().mean())
    assert res["accuracy"] > constant_acc + 0.1, res
    assert res["nll"] < constant_nll - 0.1, (res, constant_nll)
    assert math.isfinite(res["nll"])
