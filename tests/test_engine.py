"""The gradient engine: per-example gradients by hooks = vmap = a per-example loop (float64), for
every supported layer kind; hooks never stay; shared modules fall back."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import UnsupportedModuleError
from influencekit.func import per_example_gradients_loop
from influencekit.grads import GradientEngine, LayerCapture, gradients

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


class Conv1D(nn.Module):
    """The layout of transformers' GPT-2 Conv1D: y = x @ W + b with W [d_in, d_out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class TinyLM(nn.Module):
    """Embedding (with a padding row) -> LayerNorm -> Conv1D -> RMSNorm -> tied output head."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(6, d)
        self.ln = nn.LayerNorm(d)
        self.mix = Conv1D(d, d)
        self.rms = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied input / output embeddings

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        h = self.emb(ids) + self.pos(positions)
        h = self.rms(torch.tanh(self.mix(self.ln(h))))
        return self.head(h)[:, -1]


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))


def _case(name):
    torch.manual_seed(1)
    if name == "mlp":
        return _mlp().to(F64), torch.randn(6, 5, dtype=F64)
    if name == "tokens":
        return TokenModel().to(F64), torch.randn(6, 5, 4, dtype=F64)
    if name == "lm":
        return TinyLM().to(F64), torch.randint(0, 7, (6, 4))
    return ConvModel().to(F64), torch.randn(6, 2, 8, 8, dtype=F64)


def _engine_grads(target, batch, engine, of):
    params = target.params()
    values, grads = GradientEngine(target, engine)(params, batch, of)
    return values, target.space.flatten(grads, batch_dims=1)


@pytest.mark.parametrize("name", ["mlp", "tokens", "conv", "lm"])
@pytest.mark.parametrize("of", ["loss", "measurement"])
def test_hooks_equal_vmap_and_loop(name, of):
    model, x = _case(name)
    n_classes = 7 if name == "lm" else 3
    y = torch.randint(0, n_classes, (x.shape[0],))
    target = ik.Target(model, ik.ClassificationTask(measurement="margin"))
    engine = GradientEngine(target, "hooks")
    assert not engine.rest  # every parameter, the tied one included, goes through hooks
    fn = target.losses if of == "loss" else target.measurements
    _, by_loop = per_example_gradients_loop(fn, target.params(), (x, y))
    flat_loop = target.space.flatten(by_loop, batch_dims=1)
    for kind in ("hooks", "vmap", "loop", "auto"):
        values, flat = _engine_grads(target, (x, y), kind, of)
        torch.testing.assert_close(values, fn(target.params(), (x, y)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flat, flat_loop, rtol=1e-8, atol=1e-10, msg=kind)


def test_padding_row_of_an_embedding_gets_no_gradient():
    model, x = _case("lm")
    x[:, 0] = 0  # padding id
    y = torch.randint(0, 7, (x.shape[0],))
    target = ik.Target(model, ik.ClassificationTask(), params=["pos.weight", "emb.weight"])
    _, flat = _engine_grads(target, (x, y), "hooks", "loss")
    _, by_loop = per_example_gradients_loop(target.losses, target.params(), (x, y))
    torch.testing.assert_close(flat, target.space.flatten(by_loop, 1), rtol=1e-8, atol=1e-10)


def test_partial_selection_and_regularizer_match_between_engines():
    """Only some parameters (a weight without its bias, a bias without its weight) and ∇R rows."""
    model, x = _case("conv")
    y = torch.randint(0, 3, (x.shape[0],))
    target = ik.Target(model, ik.ClassificationTask(), params=["c1.weight", "c3.bias", "fc.weight"],
                       regularizer=ik.L2Regularizer(0.3))
    by = {e: gradients(target, (x, y), ik.Runtime(batch_size=4, engine=e))
          for e in ("hooks", "vmap", "loop")}
    torch.testing.assert_close(by["hooks"], by["loop"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(by["vmap"], by["loop"], rtol=1e-10, atol=1e-12)


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


def _twice():
    lin = nn.Linear(3, 3).to(F64)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin
            self.out = nn.Linear(3, 3).to(F64)

        def forward(self, x):
            return self.out(self.lin(self.lin(x)))

    return Twice(), lin


def test_shared_module_is_refused_by_hooks_and_falls_back_in_auto():
    model, lin = _twice()
    target = ik.Target(model, ik.RegressionTask())
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    with pytest.raises(UnsupportedModuleError, match="more than once"):
        _engine_grads(target, (x, y), "hooks", "loss")
    assert len(lin._forward_hooks) == 0
    engine = GradientEngine(target, "auto")
    values, grads = engine(target.params(), (x, y), "loss")
    assert engine.rest == ["lin.weight", "lin.bias"]
    assert [layer.name for layer in engine.layers] == ["out"]
    _, by_loop = per_example_gradients_loop(target.losses, target.params(), (x, y))
    torch.testing.assert_close(target.space.flatten(grads, 1), target.space.flatten(by_loop, 1),
                               rtol=1e-10, atol=1e-12)


def test_auto_uses_vmap_for_unsupported_layers():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.5, -0.5, 2.0], dtype=F64))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Linear(3, 2)).to(F64)
    target = ik.Target(model, ik.ClassificationTask())
    engine = GradientEngine(target, "auto")
    assert engine.rest == ["1.s"]
    with pytest.raises(UnsupportedModuleError, match=r"1\.s"):
        GradientEngine(target, "hooks")
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    _, grads = engine(target.params(), (x, y), "loss")
    _, by_loop = per_example_gradients_loop(target.losses, target.params(), (x, y))
    torch.testing.assert_close(target.space.flatten(grads, 1), target.space.flatten(by_loop, 1),
                               rtol=1e-10, atol=1e-12)


class SharedPositions(TinyLM):
    """Position ids of shape [1, T] (as Hugging Face models build them), broadcast over the
    batch: hooks alone would see the position embedding's gradient summed over the batch."""

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.head(self.rms(torch.tanh(self.mix(self.ln(h)))))[:, -1]


class MixedPositions(TinyLM):
    """The shared position output is summed over its first dimension before use: expanding it
    per example would change the outputs, so hooks must give it up."""

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1])[None]).sum(dim=0)
        return self.head(self.rms(torch.tanh(self.mix(self.ln(self.emb(ids) + pos)))))[:, -1]


@pytest.mark.parametrize("engine_name", ["hooks", "auto"])
def test_input_shared_by_the_batch_is_expanded_per_example(engine_name):
    torch.manual_seed(1)
    model = SharedPositions().to(F64)
    x, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 7, (6,))
    target = ik.Target(model, ik.ClassificationTask())
    before = model(x)
    engine = GradientEngine(target, engine_name)
    _, grads = engine(target.params(), (x, y), "loss")
    assert engine.rest == [] and engine.expanded == {"pos"}
    _, by_loop = per_example_gradients_loop(target.losses, target.params(), (x, y))
    torch.testing.assert_close(target.space.flatten(grads, 1), target.space.flatten(by_loop, 1),
                               rtol=1e-8, atol=1e-10)
    assert torch.equal(model(x), before)  # the model itself is untouched


def test_input_shared_and_mixed_across_the_batch_falls_back_in_auto():
    torch.manual_seed(1)
    model = MixedPositions().to(F64)
    x, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 7, (6,))
    target = ik.Target(model, ik.ClassificationTask())
    with pytest.raises(UnsupportedModuleError, match="'pos'.*first dimension 1"):
        _engine_grads(target, (x, y), "hooks", "loss")
    engine = GradientEngine(target, "auto")
    _, grads = engine(target.params(), (x, y), "loss")
    assert engine.rest == ["pos.weight"] and engine.expanded == set()
    _, by_loop = per_example_gradients_loop(target.losses, target.params(), (x, y))
    torch.testing.assert_close(target.space.flatten(grads, 1), target.space.flatten(by_loop, 1),
                               rtol=1e-8, atol=1e-10)


def test_unknown_engine_is_refused():
    model, _ = _case("mlp")
    with pytest.raises(ik.errors.InfluenceKitError, match="engine='fast'"):
        GradientEngine(ik.Target(model, ik.ClassificationTask()), "fast")


def test_layer_pass_output_gradients_without_parameter_gradients():
    """Bias-free layers (a transformer's MLP): the hooked backward gives each layer's output
    gradient equal to autograd's, leaves the model's outputs bit-identical, and never forms a
    parameter gradient (it differentiates zero probes added to the outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False),
                          nn.ReLU(inplace=True)).to(F64)
    target = ik.Target(model, ik.RegressionTask())
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    layers = GradientEngine(target, "hooks").layers
    params = ik.grads.live_params(target, F64, "cpu")
    with ik.grads.LayerPass(target, layers) as lp:
        outputs = lp.forward(params, (x, y))
        values = target.loss_from_outputs(outputs, (x, y))
        got = lp.backward(values)
    assert all(p.grad is None for p in params.values())
    assert all(p.grad is None for p in model.parameters())

    h0 = x @ params["0.weight"].T                       # the reference, by autograd
    h2 = torch.tanh(h0) @ params["2.weight"].T
    ref_values = target.loss_from_outputs(torch.relu(h2), (x, y))
    want0, want2 = torch.autograd.grad(ref_values.sum(), [h0, h2])
    assert torch.equal(outputs, torch.relu(h2))
    torch.testing.assert_close(got["0"], want0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["2"], want2, rtol=1e-12, atol=1e-14)
