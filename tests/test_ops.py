"""The op table (dualflow.ops), tested entry by entry (in the style of timm's registry-driven tests).

For every entry of ``OPS``: its moments against Monte Carlo (tolerance from the standard
error; the documented slack for the approximate rules), ``gradcheck`` of the rule, and a
converter round trip of every form it lists (module class, function, tensor method): the
converted model computes the torch result on point inputs and the rule on Gaussian inputs.
A test fails if an entry has no example here, so a new op cannot go untested.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualflow as df
from dualflow import ops

D = torch.float64
N = 200_000
Z = 5.0

# ----------------------------------------------------------------------------- helpers


def mc_check(mean, var, samples, rel_slack=0.0, abs_slack=1e-10):
    """Moments within Z standard errors of the MC estimate (plus documented slack)."""
    n = samples.shape[0]
    mm = samples.mean(0)
    c = samples - mm
    mv = (c * c).mean(0)
    se_m = (mv / n).sqrt()
    se_v = (((c**4).mean(0) - mv * mv).clamp_min(0) / n).sqrt()
    err_m, err_v = (mean - mm).abs(), (var - mv).abs()
    ok_m = err_m <= Z * se_m + abs_slack + rel_slack * mv.sqrt()
    ok_v = err_v <= Z * se_v + abs_slack + rel_slack * mv
    assert bool(ok_m.all()), f"mean off by {float((err_m / (se_m + 1e-300)).max()):.1f} SE"
    assert bool(ok_v.all()), f"variance off by {float((err_v / (se_v + 1e-300)).max()):.1f} SE"


def gauss(shape, g, lo=0.05, hi=1.5):
    m = torch.randn(shape, dtype=D, generator=g)
    v = lo + (hi - lo) * torch.rand(shape, dtype=D, generator=g)
    return df.Gaussian(m, v)


def draw(x: df.Gaussian, n: int, g) -> torch.Tensor:
    return x.mean + x.var.sqrt() * torch.randn((n, *x.mean.shape), dtype=D, generator=g)


def flat(out):
    """Tensors/Gaussians of an op output (tuples flattened)."""
    if isinstance(out, df.Gaussian) or isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


# ----------------------------------------------------------------------------- element-wise ops

# parameters for ops that need them (and non-default values for the others, where useful)
PARAMS = {
    "clamp": {"min": -0.5, "max": 1.0},
    "clamp_min": {"min": 0.2},
    "clamp_max": {"max": 0.3},
    "hardtanh": {"min_val": -0.7, "max_val": 1.3},
    "leaky_relu": {"negative_slope": 0.2},
    "elu": {"alpha": 0.8},
    "celu": {"alpha": 1.3},
    "softplus": {"beta": 2.0, "threshold": 20.0},
}
# quadrature error of the default 20-node Gauss-Hermite rule where f has kinks (measured
# against fine trapezoid integration on m in [-4, 4], v in [1e-4, 10], and stated in each
# entry's rule); smooth f and closed forms get none
GH_SLACK = {"elu": 0.025, "celu": 0.025, "selu": 0.05}

ELEMENTWISE = [op.name for op in ops.elementwise()]
M = torch.tensor([0.0, 0.7, -1.5, 3.0, -4.0, 0.1, 2.5, -0.3], dtype=D)
V = torch.tensor([1.0, 0.25, 2.0, 0.01, 4.0, 1e-6, 1.0, 0.5], dtype=D)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_moments_match_mc(name):
    op = ops.get(name)
    params = op.resolve(**PARAMS.get(name, {}))
    g = torch.Generator().manual_seed(1)
    x = M + V.sqrt() * torch.randn((N, *M.shape), dtype=D, generator=g)
    mean, var = op.moments(M, V, **params)
    slack = 0.0 if (op.closed is not None or op.smooth) else GH_SLACK.get(name, 0.0)
    mc_check(mean, var, op.fn(x, **params), rel_slack=slack)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_gradcheck(name):
    op = ops.get(name)
    params = op.resolve(**PARAMS.get(name, {}))
    g = torch.Generator().manual_seed(2)
    m = torch.randn(5, dtype=D, generator=g).requires_grad_()
    v = (0.1 + torch.rand(5, dtype=D, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: op.moments(a, b, **params), (m, v))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_point_input_is_torch(name):
    """On a point tensor the op is exactly the torch function, and small variance tends to it."""
    op = ops.get(name)
    params = op.resolve(**PARAMS.get(name, {}))
    x = torch.linspace(-3, 3, 13, dtype=D)
    torch.testing.assert_close(op.apply_elementwise(x, params), op.fn(x, **params))
    mean, _ = op.moments(x + 1e-3, torch.full_like(x, 1e-16), **params)  # off the kinks
    torch.testing.assert_close(mean, op.fn(x + 1e-3, **params), atol=1e-7, rtol=1e-7)


def _forms(op):
    """(label, torch module) for every form the entry lists, each computing the op on one input."""
    params = PARAMS.get(op.name, {})
    full = op.resolve(**params)
    out = []
    for cls in op.modules:
        try:
            mod = cls(**params)
        except TypeError:
            mod = cls()
        out.append((f"module {cls.__name__}", mod, op.module_params(mod) if op.params else {}))
    for f in op.functions:
        out.append((f"function {getattr(f, '__name__', f)}", _Call(f, params), full))
    for name in op.methods:
        out.append((f"method .{name}", _Method(name, params), full))
    return out


class _Call(nn.Module):
    def __init__(self, f, params):
        super().__init__()
        self.f, self.params = f, params

    def forward(self, x):
        return self.f(x, **self.params)


class _Method(nn.Module):
    def __init__(self, name, params):
        super().__init__()
        self.name, self.params = name, params

    def forward(self, x):
        return getattr(x.clone(), self.name)(**self.params)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_converter_round_trip(name):
    op = ops.get(name)
    forms = _forms(op)
    assert forms, f"{name}: the entry lists no module, function or method"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, dtype=D, generator=g)
    xg = gauss((3, 5), g)
    for label, mod, params in forms:
        conv = df.convert(mod)
        torch.testing.assert_close(conv(x), mod(x.clone()), msg=label)
        out = conv(xg)
        ref = op.moments(xg.mean, xg.var, **params)
        torch.testing.assert_close(out.mean, ref[0], msg=label)
        torch.testing.assert_close(out.var, ref[1], msg=label)
        if op.modules:  # from_torch builds the same dualflow module from the module class
            mods = [f for f in forms if f[0].startswith("module")]
            seq = df.nn.from_torch(nn.Sequential(mods[0][1]))
            torch.testing.assert_close(seq(xg).var, op.moments(xg.mean, xg.var, **mods[0][2])[1])


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_properties(name):
    """``monotone`` and ``gain`` are what the function does (so a wrong flag fails)."""
    op = ops.get(name)
    params = op.resolve(**PARAMS.get(name, {}))
    z = torch.linspace(-6, 6, 20001, dtype=D)
    fz = op.fn(z, **params)
    non_decreasing = bool((fz[1:] - fz[:-1] >= -1e-12).all())
    assert op.is_monotone(params) == non_decreasing
    if op.deriv is not None:  # the Taylor rule's derivative is f' (off the kinks)
        zg = (z[::7] + 1e-4).requires_grad_()
        (ref,) = torch.autograd.grad(op.fn(zg, **params).sum(), zg)
        torch.testing.assert_close(op.deriv(zg.detach(), **params), ref)
    # gain: 1 / sqrt(E f(z)^2), against adaptive quadrature (scipy)
    from scipy.integrate import quad

    def integrand(t):
        f = float(op.fn(torch.tensor(t, dtype=D), **params))
        return f * f * math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    second = quad(integrand, -12, 12, points=[-6, -3, -1, 0, 1, 3, 6], limit=200, epsabs=1e-13)[0]
    assert op.gain(params) == pytest.approx(second**-0.5, rel=1e-6)


def test_gains_and_named_values():
    assert ops.gain("relu") == math.sqrt(2.0)
    assert ops.gain("linear") == 1.0
    from dualflow.models import ACT_GAINS

    assert ACT_GAINS["silu"] == pytest.approx(1.6765324703310907, rel=1e-12)
    assert ACT_GAINS["gelu"] == pytest.approx(1.5335304411955348, rel=1e-12)
    assert set(ACT_GAINS) == set(ELEMENTWISE)


def test_monotone_depends_on_parameters():
    assert ops.is_monotone(nn.ReLU()) and ops.is_monotone(F.relu) and ops.is_monotone("tanh")
    assert ops.is_monotone(nn.LeakyReLU(0.1)) and not ops.is_monotone(nn.LeakyReLU(-0.1))
    assert ops.lookup(nn.LeakyReLU(-0.1)).monotone is False
    assert ops.lookup(df.nn.ReLU()).monotone is True
    assert ops.is_monotone(df.nn.Activation("elu", alpha=1.0))
    assert not ops.is_monotone(df.nn.GELU()) and not ops.is_monotone(nn.Linear(2, 2))
    assert not ops.is_monotone(nn.MaxPool2d(2))


def test_markdown_lists_every_op():
    text = ops.markdown()
    assert len(text.splitlines()) == 2 + len(ops.OPS)
    assert "| relu | elementwise | nn.ReLU, F.relu" in text


def test_lookup_errors_name_the_op():
    with pytest.raises(ops.UnsupportedOpError, match="sort"):
        ops.lookup(torch.sort)
    with pytest.raises(ops.UnsupportedOpError, match="nope"):
        ops.get("nope")
    with pytest.raises(ops.UnsupportedOpError, match="argsort"):
        ops.lookup_method("argsort")
    with pytest.raises(ValueError, match="unknown activation"):
        df.nn.Activation("nope")


def test_layers_and_builders_read_the_table():
    """One entry is enough for an activation to reach every layer and builder."""
    from dualflow.methods import mlp_builder
    from dualflow.models import LayerFactory

    net = mlp_builder(2, 4, 1, activation="hardswish")(True)
    acts = [m for m in net.modules() if isinstance(m, df.nn.Activation)]
    assert [a.op.name for a in acts] == ["hardswish"]
    assert LayerFactory(True, "none").act("relu6").op is ops.get("relu6")
    assert LayerFactory(True, "none").act("relu6").method == "closed"
    assert LayerFactory(True, "none", act_method="taylor").act("silu").method == "taylor"
    assert set(df.nn.ACTIVATIONS) == set(ELEMENTWISE)


# ----------------------------------------------------------------------------- the other ops
_G = torch.Generator().manual_seed(7)
W34 = torch.randn(3, 4, dtype=D, generator=_G)
B3 = torch.randn(3, dtype=D, generator=_G)
W_CONV1 = torch.randn(4, 2, 3, dtype=D, generator=_G)
W_CONV2 = torch.randn(4, 2, 3, 3, dtype=D, generator=_G)
BN = nn.BatchNorm2d(3).to(D).eval()
with torch.no_grad():
    BN.running_mean.copy_(torch.randn(3, dtype=D, generator=_G))
    BN.running_var.copy_(0.5 + torch.rand(3, dtype=D, generator=_G))
    BN.weight.copy_(torch.randn(3, dtype=D, generator=_G))
    BN.bias.copy_(torch.randn(3, dtype=D, generator=_G))


class Ex:
    """An example of an op: ``fn(*inputs)`` on tensors, the input shapes, and its tolerance.

    ``forms`` maps each listed target (module class, function, method name) to a
    ``fn(*inputs)`` using that form; ``rel`` is the documented slack of approximate rules.
    """

    def __init__(self, forms, shapes, rel=0.0, mc=True, var=(0.05, 1.5)):
        self.forms, self.shapes, self.rel, self.mc, self.var = forms, shapes, rel, mc, var


def _by_form(op, fn_of_target):
    """forms for every target of ``op``: ``fn_of_target(target)`` -> callable on inputs."""
    targets = [*op.modules, *op.functions, *op.methods]
    return {t: fn_of_target(t) for t in targets}


def _meth(name, *args, **kw):
    return lambda x, *more: getattr(x, name)(*more, *args, **kw)


def _fn(f, *args, **kw):
    return lambda *xs: f(*xs, *args, **kw)


def _binary_forms(op, extra=()):
    def form(t):
        if isinstance(t, str):
            return lambda a, b: getattr(a.clone(), t)(b, *extra)
        return lambda a, b: t(a.clone(), b, *extra)

    return _by_form(op, form)


def _examples():
    ex = {}
    o = ops.OPS
    ex["linear"] = Ex({nn.Linear: None, F.linear: _fn(F.linear, W34, B3)}, [(2, 4)])
    ex["conv1d"] = Ex({nn.Conv1d: None, F.conv1d: _fn(F.conv1d, W_CONV1, None, 1, 1)}, [(2, 2, 6)])
    ex["conv2d"] = Ex({nn.Conv2d: None, F.conv2d: _fn(F.conv2d, W_CONV2, None, 2, 1)}, [(2, 2, 5, 5)])
    w43 = W34.T.contiguous()
    ex["matmul"] = Ex(
        {
            operator.matmul: lambda x: x @ w43,
            torch.matmul: _fn(torch.matmul, w43),
            "matmul": _meth("matmul", w43),
        },
        [(2, 4)],
    )
    ex["batch_norm"] = Ex({nn.BatchNorm1d: None, nn.BatchNorm2d: lambda x: BN(x)}, [(2, 3, 2, 2)])
    # delta method, accurate where v << var(m) (measured: variance within 6%, mean 0.004 sd)
    ex["layer_norm"] = Ex(
        {nn.LayerNorm: None, F.layer_norm: _fn(F.layer_norm, (6,))}, [(3, 6)], rel=0.08, var=(0.001, 0.02)
    )
    ex["dropout"] = Ex({nn.Dropout: None, F.dropout: _fn(F.dropout, 0.3, True)}, [(2, 5)])
    ex["add"] = Ex(_binary_forms(o["add"]), [(2, 5), (2, 5)])
    ex["sub"] = Ex(_binary_forms(o["sub"]), [(2, 5), (2, 5)])
    ex["rsub"] = Ex(_binary_forms(o["rsub"]), [(2, 5), (2, 5)])
    ex["mul"] = Ex(_binary_forms(o["mul"]), [(2, 5), (2, 5)])
    ex["div"] = Ex(
        _by_form(
            o["div"],
            lambda t: (
                (lambda a: getattr(a.clone(), t)(2.5))
                if isinstance(t, str)
                else (lambda a: t(a.clone(), 2.5))
            ),
        ),
        [(2, 5)],
    )
    ex["neg"] = Ex(
        _by_form(o["neg"], lambda t: (lambda a: getattr(a, t)()) if isinstance(t, str) else t), [(2, 5)]
    )
    ex["pow"] = Ex(
        _by_form(
            o["pow"], lambda t: (lambda a: getattr(a, t)(2)) if isinstance(t, str) else (lambda a: t(a, 2))
        ),
        [(2, 5)],
    )
    ex["cat"] = Ex(_by_form(o["cat"], lambda t: lambda a, b: t([a, b], 1)), [(2, 3), (2, 4)])
    ex["stack"] = Ex({torch.stack: lambda a, b: torch.stack([a, b], 1)}, [(2, 3), (2, 3)])
    ex["flatten"] = Ex({torch.flatten: _fn(torch.flatten, 1), "flatten": _meth("flatten", 1)}, [(2, 3, 4)])
    ex["view"] = Ex({"view": lambda x: x.view(x.size(0), -1)}, [(2, 3, 4)])
    ex["reshape"] = Ex(
        {torch.reshape: _fn(torch.reshape, (2, 12)), "reshape": _meth("reshape", 4, 6)}, [(2, 3, 4)]
    )
    ex["permute"] = Ex(
        {torch.permute: _fn(torch.permute, (2, 0, 1)), "permute": _meth("permute", 1, 2, 0)}, [(2, 3, 4)]
    )
    ex["transpose"] = Ex(
        _by_form(o["transpose"], lambda t: _meth(t, 1, 2) if isinstance(t, str) else _fn(t, 1, 2)),
        [(2, 3, 4)],
    )
    ex["squeeze"] = Ex({torch.squeeze: _fn(torch.squeeze, 1), "squeeze": _meth("squeeze", 1)}, [(2, 1, 4)])
    ex["unsqueeze"] = Ex(
        {torch.unsqueeze: _fn(torch.unsqueeze, 1), "unsqueeze": _meth("unsqueeze", -1)}, [(2, 4)]
    )
    ex["chunk"] = Ex({torch.chunk: _fn(torch.chunk, 2, 1), "chunk": _meth("chunk", 2, 1)}, [(2, 4)])
    ex["split"] = Ex({torch.split: _fn(torch.split, [1, 3], 1), "split": _meth("split", 2, 1)}, [(2, 4)])
    ex["unbind"] = Ex({torch.unbind: _fn(torch.unbind, 1), "unbind": _meth("unbind", 0)}, [(2, 3)])
    ex["roll"] = Ex({torch.roll: _fn(torch.roll, 1, 1), "roll": _meth("roll", 2, 1)}, [(2, 4)])
    ex["flip"] = Ex({torch.flip: _fn(torch.flip, (1,)), "flip": _meth("flip", (0,))}, [(2, 4)])
    ex["to"] = Ex({"to": _meth("to", D)}, [(2, 4)])
    ex["expand"] = Ex({"expand": _meth("expand", 2, 3, 4)}, [(1, 3, 4)])
    ex["pad"] = Ex({F.pad: _fn(F.pad, (1, 2))}, [(2, 3)])
    ex["getitem"] = Ex({operator.getitem: lambda x: x[:, 1:3, None]}, [(2, 4)])
    ex["flatten_module"] = Ex({nn.Flatten: None}, [(2, 3, 2)])
    ex["getattr"] = Ex({getattr: lambda x: x.reshape(x.shape[0], -1)}, [(2, 3, 2)])
    ex["size"] = Ex({"size": lambda x: x.reshape(x.size(0), x.size()[1] * x.size(2))}, [(2, 3, 2)])
    ex["dim"] = Ex({"dim": lambda x: x.flatten(x.dim() - 2)}, [(2, 3, 2)])
    ex["numel"] = Ex({"numel": lambda x: x.reshape(x.numel(), 1)}, [(2, 3, 2)])
    ex["mean"] = Ex(
        {torch.mean: _fn(torch.mean, (1, 2)), "mean": _meth("mean", 1, keepdim=True)}, [(2, 3, 4)]
    )
    ex["sum"] = Ex({torch.sum: _fn(torch.sum, 1), "sum": _meth("sum", (0, 2))}, [(2, 3, 4)])
    ex["adaptive_avg_pool2d"] = Ex(
        {nn.AdaptiveAvgPool2d: None, F.adaptive_avg_pool2d: _fn(F.adaptive_avg_pool2d, (2, 3))},
        [(2, 2, 5, 7)],
    )
    ex["avg_pool2d"] = Ex(
        {nn.AvgPool2d: None, F.avg_pool2d: _fn(F.avg_pool2d, 3, 2, 1, count_include_pad=False)},
        [(2, 2, 5, 5)],
    )
    # Clark's pairwise tree on a 2x2 window: approximate (docs/maths.md section 1.3: variance up to 30%)
    ex["max_pool2d"] = Ex({nn.MaxPool2d: None, F.max_pool2d: _fn(F.max_pool2d, 2)}, [(2, 2, 4, 4)], rel=0.35)
    return ex


EXAMPLES = _examples()
OTHER = [op.name for op in ops.OPS.values() if not op.elementwise]


def test_every_op_has_an_example():
    assert sorted(EXAMPLES) == sorted(OTHER)
    for name, ex in EXAMPLES.items():
        op = ops.get(name)
        assert set(ex.forms) == {*op.modules, *op.functions, *op.methods}, name


def _module_example(name):
    """A torch module for the module form of ``name`` (with fixed, non-trivial settings)."""
    g = torch.Generator().manual_seed(11)
    mods = {
        nn.Linear: lambda: nn.Linear(4, 3),
        nn.Conv1d: lambda: nn.Conv1d(2, 4, 3, padding=1),
        nn.Conv2d: lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm1d: lambda: nn.BatchNorm1d(5),
        nn.BatchNorm2d: lambda: BN,
        nn.LayerNorm: lambda: nn.LayerNorm(6),
        nn.Dropout: lambda: nn.Dropout(0.3),
        nn.Flatten: lambda: nn.Flatten(),
        nn.AdaptiveAvgPool2d: lambda: nn.AdaptiveAvgPool2d((2, 3)),
        nn.AvgPool2d: lambda: nn.AvgPool2d(3, 2, 1),
        nn.MaxPool2d: lambda: nn.MaxPool2d(2),
    }
    _ = g
    return mods


MODULES = _module_example(None)
SHAPES = {nn.BatchNorm1d: [(4, 5)], nn.Dropout: [(2, 5)]}


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Wrap2(_Wrap):
    def forward(self, x, y):
        return self.fn(x, y)


def _cases(name):
    ex = EXAMPLES[name]
    for target, fn in ex.forms.items():
        if isinstance(target, type):
            mod = MODULES[target]().to(D)
            yield target.__name__, mod, SHAPES.get(target, ex.shapes)
        else:
            wrap = _Wrap2 if len(ex.shapes) == 2 else _Wrap
            yield getattr(target, "__name__", str(target)), wrap(fn), ex.shapes


def _reference(mod, xs, n, g, train):
    """MC: the torch op on samples of the (independent) Gaussian inputs."""
    samples = [draw(x, n, g) for x in xs]
    mod.train(train)
    with torch.no_grad():
        if len(xs) == 1:
            out = [torch.vmap(mod, randomness="different")(samples[0])] if train else _batched(mod, samples)
        else:
            out = _batched(mod, samples)
    return out


def _batched(mod, samples):
    n = samples[0].shape[0]
    chunk = 20_000
    outs = []
    for i in range(0, n, chunk):
        parts = [s[i : i + chunk] for s in samples]
        res = torch.vmap(mod)(*parts)
        outs.append(res)
    if isinstance(outs[0], torch.Tensor):
        return [torch.cat(outs)]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


@pytest.mark.parametrize("name", OTHER)
def test_op_moments_match_mc_and_round_trip(name):
    """Converted (fx) model of every form: point inputs give the torch output exactly; Gaussian
    inputs give moments within the MC tolerance (exact rules) or the documented slack."""
    op = ops.get(name)
    ex = EXAMPLES[name]
    g = torch.Generator().manual_seed(5)
    train = op.kind == "dropout"  # same seed, same mask: the converted model follows train/eval
    for label, mod, shapes in _cases(name):
        mod = mod.to(D).train(train)
        conv = df.convert(mod, bayes=False).train(train)
        xs = [torch.randn(s, dtype=D, generator=g) for s in shapes]
        torch.manual_seed(0)
        ref = flat(mod(*[x.clone() for x in xs]))
        torch.manual_seed(0)
        got = flat(conv(*xs))
        assert len(ref) == len(got), label
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, msg=f"{name} {label}")
        if op.kind == "meta" or not ex.mc:
            continue
        gx = [gauss(s, g, *ex.var) for s in shapes]
        outs = flat(conv(*gx))
        n = N // 4  # the tolerance follows the standard error of this many samples
        samples = _reference(mod, gx, n, g, train)
        for out, s in zip(outs, samples):
            out = df.as_gaussian(out)
            mc_check(out.mean, out.var, s, rel_slack=ex.rel)


@pytest.mark.parametrize("name", [n for n in OTHER if ops.get(n).kind not in ("meta",)])
def test_op_gradcheck(name):
    g = torch.Generator().manual_seed(6)
    ex = EXAMPLES[name]
    label, mod, shapes = next(iter(_cases(name)))
    conv = df.convert(mod.to(D), bayes=False).eval()
    if ops.get(name).kind == "dropout":
        conv.train()
    means = [torch.randn(s, dtype=D, generator=g).requires_grad_() for s in shapes]
    lo, hi = ex.var
    vars_ = [(lo + (hi - lo) * torch.rand(s, dtype=D, generator=g)).requires_grad_() for s in shapes]

    def f(*t):
        k = len(t) // 2
        torch.manual_seed(0)
        out = flat(conv(*[df.Gaussian(a, b) for a, b in zip(t[:k], t[k:])]))
        return tuple(x for o in out for x in df.as_gaussian(o))

    assert torch.autograd.gradcheck(f, (*means, *vars_)), label


def test_add_and_mul_of_a_value_with_itself_are_exact():
    class M(nn.Module):
        def forward(self, x):
            return x + x, x * x, x - x, torch.add(x, x, alpha=2)

    g = torch.Generator().manual_seed(8)
    x = gauss((4,), g)
    two, sq, zero, three = df.convert(M())(x)
    torch.testing.assert_close(two.var, 4 * x.var)
    torch.testing.assert_close(sq.mean, x.mean**2 + x.var)
    torch.testing.assert_close(sq.var, 2 * x.var**2 + 4 * x.mean**2 * x.var)
    assert isinstance(zero, torch.Tensor) and float(zero.abs().max()) == 0.0
    torch.testing.assert_close(three.var, 9 * x.var)
