"""The CLI's thesis JSON and the digits demo, checked against independent computations."""

import json
import subprocess
import sys

import numpy as np
import torch

from influencekit.cli.demo import digits_demo
from influencekit.runtime import Runtime


def test_cli_thesis_json_matches_closed_form():
    out = subprocess.run([sys.executable, "-m", "influencekit.cli.main", "demo", "thesis",
                          "--json"], capture_output=True, text=True, check=True).stdout
    answer = json.loads(out)
    assert set(answer) == {"theta", "param_influence", "loss_influence"}
    x, y = np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.5, 2.0])
    design = np.stack([x, np.ones(3)], axis=1)
    theta = np.linalg.lstsq(design, y, rcond=None)[0]
    grads = 2 * (design @ theta - y)[:, None] * design
    dtheta = -np.linalg.solve(2 * design.T @ design / 3, grads.T).T / 3
    np.testing.assert_allclose(answer["theta"], theta, atol=1e-12)
    np.testing.assert_allclose(answer["param_influence"], dtheta, atol=1e-12)
    np.testing.assert_allclose(answer["loss_influence"], dtheta @ grads.T, atol=1e-12)


def test_digits_demo_scores_and_report(tmp_path):
    """Small settings; the scores are re-derived with autograd + numpy, independently."""
    result = digits_demo(tmp_path / "rep", n_train=150, hidden=6, epochs=150, damping=1e-2,
                         max_queries=3, runtime=Runtime(progress=False), echo=lambda *a: None)
    report = tmp_path / "rep"
    assert result.report == report / "index.html" and result.store == report / "store"
    assert (report / "img" / "thesis_response.png").stat().st_size > 1000
    assert len(list((report / "img").glob("query_*.png"))) == len(result.query_index)
    page = result.report.read_text()
    for i in result.query_index.tolist():  # named in the report as in the terminal
        assert f"test image #{i}" in page

    from influencekit.data import load_digits_split
    from influencekit.examples.digits import train_mlp

    split = load_digits_split(n_train=150)
    model = train_mlp(split.x_train, split.y_train, hidden=6, l2_strength=1e-3, epochs=150)
    with torch.no_grad():
        wrong = (model(split.x_test).argmax(1) != split.y_test).nonzero()[:, 0][:3]
    assert torch.equal(result.query_index, wrong)
    params = list(model.parameters())

    def flat_grad(x, y, reg):
        loss = torch.nn.functional.cross_entropy(model(x[None]), y[None])
        if reg:
            loss = loss + 0.5e-3 * sum((p ** 2).sum() for p in params)
        return torch.cat([g.ravel() for g in torch.autograd.grad(loss, params)]).numpy()

    # GGN of the mean loss: Σ Jᵀ(diag(p) − ppᵀ)J / n + 1e-3 I (the L2 term), then + λI
    def outputs(flat, x):
        return torch.func.functional_call(model, _unflat(flat, model), (x[None],))[0]

    flat = torch.cat([p.detach().ravel() for p in params])
    ggn = np.zeros((flat.numel(), flat.numel()))
    for x in split.x_train:
        jac = torch.autograd.functional.jacobian(lambda f, x=x: outputs(f, x), flat).numpy()
        p = torch.softmax(model(x[None])[0], 0).detach().numpy()
        ggn += jac.T @ (np.diag(p) - np.outer(p, p)) @ jac
    ggn = ggn / 150 + 1e-3 * np.eye(flat.numel()) + 1e-2 * np.eye(flat.numel())
    q = int(result.query_index[0])
    gq = flat_grad(split.x_test[q], split.y_test[q], reg=False)
    for m in (0, 77, 149):
        gm = flat_grad(split.x_train[m], split.y_train[m], reg=True)
        expected = gq @ np.linalg.solve(ggn, gm)
        np.testing.assert_allclose(float(result.scores[0, m]), expected, rtol=1e-7)


def _unflat(flat, model):
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def test_digits_demo_trust_report_smallest_hessian_eigenvalue(tmp_path):
    """--trust: the report's λ_min/λ_max of the Hessian equals an autograd Hessian's (p = 460,
    small enough for the exact dense path)."""
    result = digits_demo(tmp_path / "rep", n_train=120, hidden=6, epochs=100, damping=1e-2,
                         max_queries=2, trust=True, runtime=Runtime(progress=False),
                         echo=lambda *a: None)
    finding = next(f for f in result.trust.findings if f.name == "min/max Hessian eigenvalue")
    assert finding.how.startswith("exact")
    from influencekit.data import load_digits_split
    from influencekit.examples.digits import train_mlp

    split = load_digits_split(n_train=120)
    model = train_mlp(split.x_train, split.y_train, hidden=6, l2_strength=1e-3, epochs=100)
    flat = torch.cat([p.detach().ravel() for p in model.parameters()])

    def objective(f):
        out = torch.func.functional_call(model, _unflat(f, model), (split.x_train,))
        return torch.nn.functional.cross_entropy(out, split.y_train) + 0.5e-3 * (f ** 2).sum()

    hessian = torch.autograd.functional.hessian(objective, flat)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    expected = float(eigenvalues[0] / eigenvalues[-1].abs())
    np.testing.assert_allclose(finding.value, expected, rtol=1e-6, atol=1e-10)
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "How far to trust these scores" in html and "Hessian-GGN gap" in html
