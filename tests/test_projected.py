"""Per-layer (factored) projections, the projected gradient store, and inverses fitted in the
projected space: identity projections give the unprojected scores exactly, random ones
converge to them as the dimensions grow; the store resumes, is bit-identical to an
uninterrupted build and refuses another configuration (float64)."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import StoreError, UnsupportedModuleError
from influencekit.grads import LayerProjection, find_layers
from influencekit.scoring import (
    ProjectedCurvature,
    ProjectedEKFAC,
    ProjectedInfluence,
    build_gradient_store,
    projected,
)
from influencekit.storage import GradientStore

from .transformer_models import F64, classification_data, lm_data, tiny_bert, tiny_gpt2

DAMPING = 1e-2
BERT_LAST = ["bert.encoder.layer.1.output.dense", "bert.pooler.dense", "classifier"]
IDENTITY = LayerProjection(kind="identity")


def _bert(norm=False):
    params = BERT_LAST + (["bert.encoder.layer.1.output.LayerNorm"] if norm else [])
    target = ik.Target(tiny_bert(), ik.SequenceClassificationTask(), params=params,
                       regularizer=ik.L2Regularizer(1e-2))
    return target, classification_data(8, seed=7), classification_data(3, seed=8)


class BagOfEmbeddings(nn.Module):
    """An untied embedding (with a padding index) and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.out = nn.Linear(3, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).mean(1))


def _embedding_problem():
    torch.manual_seed(0)
    model = BagOfEmbeddings().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (10, 5), generator=gen), torch.randint(0, 4, (10,), generator=gen)
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    return target, (x[:7], y[:7]), (x[7:], y[7:])


def _close(got, expected, rtol=1e-9):
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def _relative_error(got, expected) -> float:
    return float((got - expected).norm() / expected.norm())


# -- the projection itself ------------------------------------------------------------------------
def test_layer_projection_is_the_kronecker_product_on_the_row_major_gradient():
    """vec(P_outᵀ G P_in) = (P_out ⊗ P_in)ᵀ vec(G): the projection of the flat gradient by the
    Kronecker product, which is never formed; seeded per layer name, same draws every time."""
    target, _, _ = _bert()
    layer = find_layers(target)[0]
    projection = LayerProjection((3, 5), kind="rademacher", seed=4)
    p_out, p_in = projection.matrices(layer)
    assert p_out.shape == (layer.d_out, 3) and p_in.shape == (layer.width, 5)
    assert set(torch.unique(p_out * 3 ** 0.5).tolist()) <= {-1.0, 1.0}
    g = torch.randn(2, layer.d_out, layer.width, dtype=F64)
    kron = torch.kron(p_out, p_in)                                   # [d_out·width, 15]
    expected = g.reshape(2, -1) @ kron
    torch.testing.assert_close(projection.project_matrix(layer, g).reshape(2, -1), expected)
    again = LayerProjection((3, 5), kind="rademacher", seed=4).matrices(layer)
    assert torch.equal(again[0], p_out) and torch.equal(again[1], p_in)
    other = LayerProjection((3, 5), kind="rademacher", seed=5).matrices(layer)
    assert not torch.equal(other[0], p_out)


def test_projected_gradients_equal_projecting_the_per_example_gradients():
    """The factored projection of a batch equals the per-example gradients (from the engine)
    projected layer by layer, with ∇R added."""
    target, train, _ = _bert(norm=True)
    projection = LayerProjection({"classifier": (2, 4), None: 3}, seed=2)
    rows = torch.cat([g for _, g in projected.iter_projected_gradients(
        target, train, projection)])
    _, grads = ik.grads.GradientEngine(target, "loop")(target.params(), train, "loss")
    reg = target.space.unflatten(ik.grads.regularizer_gradient(target, target.params()))
    grads = {n: g + reg[n] for n, g in grads.items()}
    parts = []
    for layer in projected.projected_layers(target):
        if layer.kind == "layernorm":
            parts.append(torch.cat([grads[layer.weight], grads[layer.bias]], dim=1))
        else:
            matrix = ik.grads.layer_matrix(layer, grads)
            parts.append(projection.project_matrix(layer, matrix).reshape(8, -1))
    _close(rows, torch.cat(parts, dim=1))
    shapes = dict(projected.layout_config(target, projection)[i][::2]
                  for i in range(len(parts)))
    assert shapes["classifier"] == [2, 4] and shapes["bert.pooler.dense"] == [3, 3]


# -- identity projection = no projection ----------------------------------------------------------
def test_identity_projection_gives_the_unprojected_scores():
    target, train, query = _bert(norm=True)
    curvature = ik.Curvature(target, train)
    exact = ik.Influence(target, ik.Exact(DAMPING).fit(curvature)).pairwise(query, train)
    projected_exact = ik.Exact(DAMPING).fit(ProjectedCurvature(curvature, IDENTITY))
    scorer = ProjectedInfluence(target, IDENTITY, projected_exact)
    _close(scorer.pairwise(query, train), exact)
    _close(scorer.self_influence(train),
           ik.Influence(target, ik.Exact(DAMPING).fit(curvature)).self_influence(train))
    # EK-FAC: the unprojected EKFAC factors Linear layers (no LayerNorm)
    target, train, query = _bert()
    curvature = ik.Curvature(target, train)
    ekfac = ik.Influence(target, ik.EKFAC(DAMPING).fit(curvature)).pairwise(query, train)
    fitted = ProjectedEKFAC(DAMPING).fit(ProjectedCurvature(curvature, IDENTITY))
    _close(ProjectedInfluence(target, IDENTITY, fitted).pairwise(query, train), ekfac)


def test_identity_projection_on_gpt2_with_sampled_labels_and_on_an_embedding():
    model = tiny_gpt2()
    target = ik.Target(model, ik.CausalLMTask(), regularizer=ik.L2Regularizer(1e-2),
                       params=["transformer.h.1.attn", "transformer.h.1.mlp"])
    train, query = lm_data(7, seed=1), lm_data(2, seed=2)
    curvature = ik.Curvature(target, train)
    ekfac = ik.Influence(target, ik.EKFAC(DAMPING).fit(curvature)).pairwise(query, train)
    fitted = ProjectedEKFAC(DAMPING).fit(ProjectedCurvature(curvature, IDENTITY))
    _close(ProjectedInfluence(target, IDENTITY, fitted).pairwise(query, train), ekfac)
    target, train, query = _embedding_problem()
    curvature = ik.Curvature(target, train)
    exact = ik.Influence(target, ik.Exact(DAMPING).fit(curvature)).pairwise(query, train)
    fitted = ik.Exact(DAMPING).fit(ProjectedCurvature(curvature, IDENTITY))
    _close(ProjectedInfluence(target, IDENTITY, fitted).pairwise(query, train), exact)


# -- convergence with the dimension ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projected_scores_converge_to_unprojected_as_the_dimension_grows(kind):
    """P (PᵀCP + λI)⁻¹ Pᵀ = PPᵀ(C PPᵀ + λI)⁻¹ → (C + λI)⁻¹ as PPᵀ → I (error ~ sqrt(d/k)): the
    projected scores equal that closed form at every k, and their error shrinks with k."""
    target, train, query = _embedding_problem()
    curvature = ik.Curvature(target, train)
    dense = curvature.dense()
    eye = torch.eye(dense.shape[0], dtype=F64)
    g_query = ik.grads.gradients(target, query, of="measurement")
    g_train = ik.grads.gradients(target, train)
    exact = g_query @ torch.linalg.solve(dense + DAMPING * eye, g_train.T)
    errors = []
    for k in (2, 6, 24):
        projection = LayerProjection(k, kind=kind, seed=3)
        fitted = ik.Exact(DAMPING).fit(ProjectedCurvature(curvature, projection))
        scores = ProjectedInfluence(target, projection, fitted).pairwise(query, train)
        ppt = _projector(target, projection)                             # PPᵀ [p, p]
        closed = g_query @ ppt @ torch.linalg.solve(dense @ ppt + DAMPING * eye, g_train.T)
        _close(scores, closed, rtol=1e-8)
        errors.append(_relative_error(scores, exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 2


def _projector(target, projection) -> torch.Tensor:
    """PPᵀ in the flat parameter layout: per layer (P_out P_outᵀ) ⊗ (P_in P_inᵀ) on the
    gradient matrix, mapped to the parameters' positions."""
    p = target.num_params
    out = torch.zeros(p, p, dtype=F64)
    for layer in projected.projected_layers(target):
        p_out, p_in = projection.matrices(layer)
        index = ik.grads.layer_index(layer, target.space).reshape(-1)
        out[index[:, None], index[None, :]] = torch.kron(p_out @ p_out.T, p_in @ p_in.T)
    return out


def test_projected_ekfac_converges_to_ekfac():
    target, train, query = _bert()
    curvature = ik.Curvature(target, train)
    ekfac = ik.Influence(target, ik.EKFAC(DAMPING).fit(curvature)).pairwise(query, train)
    errors = []
    for k in (2, 8, 64):
        projection = LayerProjection(k, seed=1)
        fitted = ProjectedEKFAC(DAMPING).fit(ProjectedCurvature(curvature, projection))
        errors.append(_relative_error(
            ProjectedInfluence(target, projection, fitted).pairwise(query, train), ekfac))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.15


# -- the store ------------------------------------------------------------------------------------
def test_store_scores_equal_scores_from_data_and_resume_bit_identically(tmp_path, monkeypatch):
    target, train, query = _bert(norm=True)
    projection = LayerProjection(4, seed=0)
    curvature = ik.Curvature(target, train)
    inverse = ProjectedEKFAC(DAMPING).fit(ProjectedCurvature(curvature, projection))
    scorer = ProjectedInfluence(target, projection, inverse)
    runtime = ik.Runtime(batch_size=3)
    whole = build_gradient_store(tmp_path / "whole", target, train, projection, runtime,
                                 dtype="float64")
    from_data = scorer.pairwise(query, train)
    _close(scorer.pairwise(query, whole), from_data, rtol=1e-12)
    _close(scorer.self_influence(whole), scorer.self_influence(train), rtol=1e-12)
    # a run that dies after its first batch, then resumes
    original = projected.iter_projected_gradients

    def dies_after_one_batch(*args, **kwargs):
        stream = original(*args, **kwargs)
        yield next(stream)
        raise KeyboardInterrupt

    monkeypatch.setattr(projected, "iter_projected_gradients", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        build_gradient_store(tmp_path / "resumed", target, train, projection, runtime,
                             dtype="float64")
    monkeypatch.undo()
    partial = GradientStore.load(tmp_path / "resumed")
    assert partial.pending() == [3, 4, 5, 6, 7] and not partial.complete
    with pytest.raises(StoreError, match="not complete"):
        scorer.pairwise(query, partial)
    resumed = build_gradient_store(tmp_path / "resumed", target, train, projection, runtime,
                                   dtype="float64")
    assert torch.equal(resumed.rows(0, 8), whole.rows(0, 8))


def test_store_refuses_another_configuration(tmp_path):
    target, train, query = _bert()
    projection = LayerProjection(3, seed=0)
    store = build_gradient_store(tmp_path, target, train, projection)
    assert store.config["projection"] == {"dim": 3, "kind": "gaussian", "seed": 0}
    with pytest.raises(StoreError, match="projection"):
        build_gradient_store(tmp_path, target, train, LayerProjection(3, seed=1))
    with pytest.raises(StoreError, match="data_fingerprint"):
        build_gradient_store(tmp_path, target, classification_data(8, seed=70), projection)
    stale = ProjectedEKFAC(DAMPING).fit(ProjectedCurvature(ik.Curvature(target, train),
                                                           projection))
    with torch.no_grad():
        target.model.classifier.bias.add_(0.1)          # the model moved on
    with pytest.raises(ik.errors.ModelMismatchError):
        ProjectedInfluence(target, projection, stale).pairwise(query, train)
    fresh = stale.clone().fit(ProjectedCurvature(ik.Curvature(target, train), projection))
    with pytest.raises(StoreError, match="model_fingerprint"):      # the store is stale
        ProjectedInfluence(target, projection, fresh).pairwise(query, GradientStore.load(tmp_path))
    other = LayerProjection(3, seed=9)
    with pytest.raises(ik.errors.ModelMismatchError, match="projection"):
        ProjectedInfluence(target, other, fresh).pairwise(query, train)


def test_tied_weights_are_refused_with_the_fix():
    model = tiny_gpt2()
    target = ik.Target(model, ik.CausalLMTask(), params=["transformer.wte", "transformer.h.1.mlp"])
    with pytest.raises(UnsupportedModuleError, match="tied weights"):
        build_gradient_store("unused", target, lm_data(2, seed=1), IDENTITY)
