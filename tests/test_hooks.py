"""Layer hooks: per-example gradients by hooks equal torch.func (vmap) and a loop;
hooks never stay."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import UnsupportedModuleError
from influencekit.func import per_example_gradients, per_example_gradients_loop
from influencekit.grads import HookGradients, LayerCapture, gradients, hook_gradients

F64 = torch.float64


class TokenModel(nn.Module):
    """Transformer-style: a Linear on [B, T, d] tokens, then another, averaged over tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).mean(dim=1)


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2, dilation=2, padding_mode="reflect", padding=1, bias=False)
        self.c3 = nn.Conv2d(4, 2, 3, padding="same")
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.relu(self.c3(h))
        return self.fc(h.flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))


def _case(name):
    torch.manual_seed(1)
    if name == "mlp":
        return _mlp().to(F64), torch.randn(6, 5, dtype=F64)
    if name == "tokens":
        return TokenModel().to(F64), torch.randn(6, 5, 4, dtype=F64)
    return ConvModel().to(F64), torch.randn(6, 2, 8, 8, dtype=F64)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
@pytest.mark.parametrize("which", ["loss", "measurement"])
def test_hook_gradients_equal_vmap_and_loop(name, which):
    model, x = _case(name)
    y = torch.randint(0, 3, (x.shape[0],))
    target = ik.Target(model, ik.ClassificationTask(measurement="margin"))
    params = target.params()
    fn = target.losses if which == "loss" else target.measurements
    _, by_vmap = per_example_gradients(fn, params, (x, y))
    _, by_loop = per_example_gradients_loop(fn, params, (x, y))
    values, by_hooks = HookGradients(target)(params, (x, y), which)
    torch.testing.assert_close(values, fn(params, (x, y)), rtol=1e-12, atol=1e-12)
    flat_vmap = target.space.flatten(by_vmap, batch_dims=1)
    flat_loop = target.space.flatten(by_loop, batch_dims=1)
    torch.testing.assert_close(by_hooks, flat_vmap, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(by_hooks, flat_loop, rtol=1e-10, atol=1e-12)


def test_partial_selection_and_regularizer_match_iter_gradients():
    """Only some parameters (a weight without its bias, a bias without its weight) and ∇R rows."""
    model, x = _case("conv")
    y = torch.randint(0, 3, (x.shape[0],))
    target = ik.Target(model, ik.ClassificationTask(), params=["c1.weight", "c3.bias", "fc.weight"],
                       regularizer=ik.L2Regularizer(0.3))
    runtime = ik.Runtime(batch_size=4)
    torch.testing.assert_close(hook_gradients(target, (x, y), runtime),
                               gradients(target, (x, y), runtime), rtol=1e-10, atol=1e-12)


def test_buffers_are_reused_between_batches():
    model, x = _case("mlp")
    y = torch.randint(0, 3, (6,))
    target = ik.Target(model, ik.ClassificationTask())
    computer = HookGradients(target)
    params = target.params()
    _, first = computer(params, (x[:3], y[:3]))
    first_copy = first.clone()
    _, second = computer(params, (x[3:], y[3:]))
    assert second.data_ptr() == first.data_ptr()
    _, expected = per_example_gradients(target.losses, params, (x[3:], y[3:]))
    torch.testing.assert_close(second, target.space.flatten(expected, 1), rtol=1e-10, atol=0)
    assert not torch.allclose(first_copy, second)


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()]


def test_capture_removes_hooks_also_on_exception():
    model = _mlp().to(F64)
    ids = [id(m) for m in model.modules()]
    before = _hook_counts(model)
    modules = {"0": model[0], "2": model[2]}
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(modules):
            seen.append(len(model[0]._forward_hooks))
            raise RuntimeError("boom")
    assert seen == [1]
    assert _hook_counts(model) == before
    assert [id(m) for m in model.modules()] == ids
    assert all(len(m._forward_hooks) == 0 and len(m._backward_hooks) == 0
               for m in model.modules())


def test_shared_module_is_refused_and_hooks_removed():
    lin = nn.Linear(3, 3).to(F64)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    target = ik.Target(model, ik.RegressionTask())
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    with pytest.raises(UnsupportedModuleError, match="more than once"):
        HookGradients(target)(target.params(), (x, y))
    assert len(lin._forward_hooks) == 0


def test_unsupported_parameters_are_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    target = ik.Target(model, ik.ClassificationTask())
    with pytest.raises(UnsupportedModuleError, match=r"1\.weight.*LayerNorm.*block_diagonal"):
        HookGradients(target)
