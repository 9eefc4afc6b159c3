"""Per-example gradients: torch.func (vmap) against a plain loop, and against autograd."""

import torch
from torch import nn

import influencekit as ik
from influencekit.func import per_example_gradients, per_example_gradients_loop
from influencekit.grads import gradients

from .helpers import classification_data, mlp


def test_vmap_equals_loop_float64():
    model = mlp()
    target = ik.Target(model, ik.ClassificationTask())
    x, y = classification_data(n=7)
    params = target.params()
    values_v, grads_v = per_example_gradients(target.losses, params, (x, y))
    values_l, grads_l = per_example_gradients_loop(target.losses, params, (x, y))
    torch.testing.assert_close(values_v, values_l, rtol=1e-12, atol=1e-14)
    for name in params:
        torch.testing.assert_close(grads_v[name], grads_l[name], rtol=1e-12, atol=1e-14)


def test_dataset_gradients_equal_autograd_of_each_loss():
    model = mlp()
    target = ik.Target(model, ik.ClassificationTask(measurement="margin"),
                       regularizer=ik.L2Regularizer(0.3))
    x, y = classification_data(n=9)
    g = gradients(target, (x, y), ik.Runtime(batch_size=4))
    assert g.shape == (9, target.num_params)
    for i in (0, 5, 8):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        reg = 0.15 * sum((p ** 2).sum() for p in model.parameters())
        (loss + reg).backward()
        expected = torch.cat([p.grad.ravel() for p in model.parameters()])
        torch.testing.assert_close(g[i], expected, rtol=1e-12, atol=1e-14)
    # measurement gradients do not include the regulariser
    gq = gradients(target, (x, y), of="measurement")
    out = model(x[3:4])[0]
    margin = out[y[3]] - torch.cat([out[:y[3]], out[y[3] + 1:]]).max()
    expected = torch.autograd.grad(margin, list(model.parameters()))
    torch.testing.assert_close(gq[3], torch.cat([e.ravel() for e in expected]))


def test_batch_size_does_not_change_gradients():
    target = ik.Target(mlp(), ik.ClassificationTask())
    data = classification_data(n=11)
    a = gradients(target, data, ik.Runtime(batch_size=11))
    b = gradients(target, data, ik.Runtime(batch_size=3))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_float32_runtime_close_to_float64():
    target = ik.Target(mlp(), ik.ClassificationTask())
    data = classification_data(n=6)
    g64 = gradients(target, data)
    g32 = gradients(target, data, ik.Runtime(dtype=torch.float32))
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-5)


def test_params_subset_selects_columns():
    model = mlp()
    full = ik.Target(model, ik.ClassificationTask())
    last = ik.Target(model, ik.ClassificationTask(), params=["2.weight", "2.bias"])
    data = classification_data(n=5)
    g_full = gradients(full, data)
    g_last = gradients(last, data)
    sl = full.space.slices()
    torch.testing.assert_close(g_last, torch.cat([g_full[:, sl["2.weight"]],
                                                  g_full[:, sl["2.bias"]]], dim=1))
