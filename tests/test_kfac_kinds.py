"""K-FAC / EK-FAC of embeddings and LayerNorms (``kinds=``): the statistics against their dense
definitions (one-hot matrices, per-example outer products); the fitted blocks against the dense
damped GGN where the factorisation is exact (a norm's block; an embedding with one real token)
and against an explicit dense eigenbasis reference (EK-FAC); factored scores against flat ones
on the tiny GPT-2 and BERT (float64)."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.curvature import kfac_kinds
from influencekit.errors import InfluenceKitError, UnsupportedModuleError
from influencekit.storage import load_inverse, save_inverse

from .transformer_models import (
    classification_data,
    lm_data,
    padded,
    tiny_bert,
    tiny_gpt2,
)

F64 = torch.float64


def test_embedding_factor_is_the_diagonal_of_the_one_hot_covariance():
    gen = torch.Generator().manual_seed(0)
    module = nn.Embedding(6, 3, padding_idx=0)
    x = torch.randint(0, 6, (4, 5), generator=gen)
    mask = torch.rand(4, 5, generator=gen) > 0.3
    ids = kfac_kinds.embedding_ids(module, x, mask)
    w = torch.rand(4, dtype=F64, generator=gen) + 0.5
    real = (ids >= 0).to(F64)
    counts = real.sum(1).clamp_min(1)
    one_hot = torch.nn.functional.one_hot(x, 6).to(F64) * real[..., None]
    dense = torch.einsum("b,bti,btj->ij", w / counts, one_hot, one_hot)
    got = kfac_kinds.embedding_factor_sum(ids, w, counts, 6)
    torch.testing.assert_close(torch.diag(got), dense)                   # dense is diagonal


def test_embedding_correction_equals_squared_per_example_gradient_columns():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 7, (3, 6), generator=gen)
    rotated = torch.randn(3, 6, 4, dtype=F64, generator=gen)
    coef = torch.rand(3, dtype=F64, generator=gen)
    one_hot = torch.nn.functional.one_hot(ids.clamp_min(0), 7).to(F64) * (ids >= 0)[..., None]
    per_example = torch.einsum("bto,btv->bov", rotated, one_hot)         # Q_Sᵀ G_b  [B, d, V]
    expected = torch.einsum("b,bov->ov", coef, per_example ** 2)
    torch.testing.assert_close(kfac_kinds.embedding_correction_sum(ids, rotated, coef, 7),
                               expected)


def test_norm_block_is_the_weighted_outer_product_of_per_example_gradients():
    from influencekit.grads import Layer

    gen = torch.Generator().manual_seed(2)
    layer = Layer("ln", "layernorm", "ln.weight", "ln.bias", 3, 3)
    xhat, delta = (torch.randn(4, 5, 3, dtype=F64, generator=gen) for _ in range(2))
    g = kfac_kinds.norm_gradients(layer, xhat, delta)
    loop = torch.stack([torch.cat([(delta[b] * xhat[b]).sum(0), delta[b].sum(0)])
                        for b in range(4)])
    torch.testing.assert_close(g, loop)
    coef = torch.rand(4, dtype=F64, generator=gen)
    block = kfac_kinds.norm_block_sum(g, coef, diagonal=False)
    expected = sum(c * torch.outer(r, r) for c, r in zip(coef, loop, strict=True))
    torch.testing.assert_close(block, expected)
    torch.testing.assert_close(kfac_kinds.norm_block_sum(g, coef, diagonal=True),
                               torch.diagonal(block))


# -- KFAC / EKFAC with kinds=: against the dense damped GGN and flat scores ---------------------
DAMPING = 1e-2
BERT_WORDS = "bert.embeddings.word_embeddings"
BERT_KINDS = [f"{BERT_WORDS}.weight", "bert.embeddings.token_type_embeddings.weight",
              "bert.embeddings.LayerNorm", "bert.encoder.layer.1.output.LayerNorm",
              "bert.encoder.layer.1.output.dense", "classifier"]
GPT2_KINDS = ["transformer.h.1", "transformer.ln_f"]


def _module_blocks(target) -> list[torch.Tensor]:
    """Flat positions of each module's selected parameters (K-FAC's blocks), from names."""
    slices = target.space.slices()
    modules: dict[str, list[int]] = {}
    for name in target.space.names:
        s = slices[name]
        modules.setdefault(name.rpartition(".")[0], []).extend(range(s.start, s.stop))
    return [torch.tensor(v) for v in modules.values()]


def _block_diagonal(dense, target):
    out = torch.zeros_like(dense)
    for idx in _module_blocks(target):
        out[idx[:, None], idx[None, :]] = dense[idx[:, None], idx[None, :]]
    return out


def _damped_solve(matrix, lam, g):
    return torch.linalg.solve(matrix + lam * torch.eye(matrix.shape[0], dtype=F64), g.T).T


def _close(got, expected, rtol=1e-8):
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher"])
def test_norm_layers_are_their_exact_ggn_blocks(kind):
    """LayerNorms of GPT-2 (sequences of uneven length, padded) and BERT, many examples: the
    K-FAC and EK-FAC block of a norm is its exact curvature block, so solve = the block-diagonal
    (per module) dense damped curvature solve, and matrix() = the dense blocks."""
    gpt2, bert = tiny_gpt2(), tiny_bert()
    problems = [(ik.Target(gpt2, ik.CausalLMTask(), params=[
        "transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]), lm_data(5, 1))]
    if kind == "ggn":  # the LM's GGN needs sampled labels in K-FAC: compare the BERT one
        problems = [(ik.Target(bert, ik.SequenceClassificationTask(), params=[
            "bert.embeddings.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"]),
            classification_data(6, 2))]
    for target, data in problems:
        curvature = ik.Curvature(target, data, kind=kind)
        blocks = _block_diagonal(curvature.dense(), target)
        g = torch.randn(3, target.num_params, dtype=F64, generator=torch.Generator().manual_seed(0))
        for method in (ik.KFAC, ik.EKFAC):
            fitted = method(DAMPING, kinds="all").fit(curvature, stationarity=False)
            assert {layer.kind for layer in fitted.layers_} == {"layernorm"}
            _close(fitted.matrix(), blocks, rtol=1e-10)
            _close(fitted.solve(g), _damped_solve(blocks, DAMPING, g), rtol=1e-9)


def test_large_norm_keeps_the_diagonal_of_its_block(monkeypatch):
    """Past NORM_EXACT_LIMIT a norm keeps the diagonal of its exact block (both methods)."""
    monkeypatch.setattr(kfac_kinds, "NORM_EXACT_LIMIT", 4)
    target = ik.Target(tiny_bert(), ik.SequenceClassificationTask(),
                       params=["bert.encoder.layer.1.output.LayerNorm"])
    curvature = ik.Curvature(target, classification_data(6, 2))
    diagonal = torch.diag(torch.diagonal(curvature.dense()))
    for method in (ik.KFAC, ik.EKFAC):
        fitted = method(DAMPING, kinds=["layernorm"]).fit(curvature, stationarity=False)
        assert fitted.s_eigenvectors_[0].numel() == 0  # identity basis, not stored
        _close(fitted.matrix(), diagonal, rtol=1e-10)


def _one_token(filler: int):
    """One BERT example: token 3, then four MASKED tokens of id ``filler``."""
    batch = padded([[3]], length=5)
    batch["input_ids"][0, 1:] = filler
    return {**batch, "labels": torch.tensor([1])}


class _NoMask(ik.SequenceClassificationTask):
    def token_mask(self, batch):
        return None


@pytest.mark.parametrize("filler", [0, 5])  # 0: the padding index; 5: a real id, masked
def test_embedding_with_one_token_is_the_exact_damped_ggn_block(filler):
    """One real token: the embedding's gradient is δ e_idᵀ, so K-FAC (A = e_id e_idᵀ) and EK-FAC
    equal the exact damped GGN block — only if masked tokens stay out of A (and out of S)."""
    model = tiny_bert()
    data = _one_token(filler)
    target = ik.Target(model, ik.SequenceClassificationTask(), params=[f"{BERT_WORDS}.weight"])
    curvature = ik.Curvature(target, data)
    dense = curvature.dense()
    lam = 1e-3 * float(torch.linalg.eigvalsh(dense)[-1])
    g = torch.randn(3, target.num_params, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = _damped_solve(dense, lam, g)
    for method in (ik.KFAC, ik.EKFAC):
        fitted = method(lam, kinds=["embedding"]).fit(curvature, stationarity=False)
        assert fitted.a_eigenvectors_[0].numel() == 0  # diagonal A: no V x V basis
        _close(fitted.solve(g), expected, rtol=1e-9)
        _close(fitted.matrix(), dense, rtol=1e-9)
    unmasked = ik.Target(model, _NoMask(), params=target.space.names)
    wrong = ik.KFAC(lam, kinds=["embedding"]).fit(ik.Curvature(unmasked, data),
                                                  stationarity=False)
    err = float((wrong.solve(g) - expected).norm() / expected.norm())
    if filler == 0:   # the padding index never reaches the weight: no mask needed
        assert err < 1e-9
    else:             # a masked real id in the statistics is far off
        assert err > 0.1


def test_ekfac_embedding_equals_its_dense_eigenbasis_reference():
    """Many examples and tokens: EK-FAC's embedding block is (Q_S ⊗ I) diag(Λ) (Q_S ⊗ I)ᵀ with
    Λ = diag((Q_S ⊗ I)ᵀ C (Q_S ⊗ I)) of the dense GGN C (exact labels); its solve is that
    matrix's damped inverse. K-FAC's is S ⊗ diag(a) with a the token frequencies."""
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=[f"{BERT_WORDS}.weight"])
    data = classification_data(7, seed=4)
    curvature = ik.Curvature(target, data)
    dense = curvature.dense()
    fitted = ik.EKFAC(DAMPING, kinds="all").fit(curvature, stationarity=False)
    vocab, d = model.config.vocab_size, model.config.hidden_size
    # the stored weight is [V, d]; its flat entry (v, o) is row o, column v of the layout [d, V]
    perm = torch.arange(vocab * d).reshape(vocab, d).T.reshape(-1)
    basis = torch.kron(fitted.s_eigenvectors_[0], torch.eye(vocab, dtype=F64))
    q = torch.zeros_like(basis)
    q[perm] = basis                                   # columns: basis vectors, in flat order
    lam = torch.diagonal(q.T @ dense @ q)
    assert float(lam.min()) >= -1e-14 and float(lam.abs().sum()) > 0
    _close(fitted.corrected_eigenvalues_[0].reshape(-1), lam, rtol=1e-9)
    reference = (q * (lam + DAMPING)) @ q.T
    g = torch.randn(3, target.num_params, dtype=F64, generator=torch.Generator().manual_seed(2))
    _close(fitted.solve(g), torch.linalg.solve(reference, g.T).T, rtol=1e-9)
    # K-FAC: A = diag(mean over examples of the per-example token frequencies)
    kfac = ik.KFAC(DAMPING, kinds="all").fit(curvature, stationarity=False)
    ids, mask = data["input_ids"], data["attention_mask"].to(F64)
    freq = torch.stack([torch.bincount(ids[i][ids[i] != 0], minlength=vocab).to(F64)
                        / mask[i].sum() for i in range(ids.shape[0])]).mean(0)
    _close(kfac.a_eigenvalues_[0], freq, rtol=1e-12)


def _bert_kinds_problem():
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=BERT_KINDS,
                       regularizer=ik.L2Regularizer(1e-2))
    return target, classification_data(8, seed=7), classification_data(3, seed=8)


def _gpt2_kinds_problem():
    target = ik.Target(tiny_gpt2(), ik.CausalLMTask(), params=GPT2_KINDS,
                       regularizer=ik.L2Regularizer(1e-2))
    return target, lm_data(9, seed=1), lm_data(3, seed=2)


@pytest.mark.parametrize("make", [_bert_kinds_problem, _gpt2_kinds_problem])
@pytest.mark.parametrize("method", [ik.KFAC, ik.EKFAC])
def test_factored_scores_equal_flat_with_embeddings_and_norms(make, method):
    """Factored scoring (per-layer solve_per_parameter, hooked terms) = the flat path
    (solve on [k, p]) with embeddings, LayerNorms, Linear / Conv1D layers in one K-FAC."""
    target, train, query = make()
    fitted = method(DAMPING, kinds="all").fit(ik.Curvature(target, train), stationarity=False)
    kinds = {layer.kind for layer in fitted.layers_}
    assert {"layernorm"} <= kinds and len(kinds) >= 2
    auto, flat = ik.Influence(target, fitted), ik.Influence(target, fitted, path="flat")
    assert auto.factored
    reference = flat.pairwise(query, train)
    _close(auto.pairwise(query, train), reference)
    _close(auto.self_influence(train), flat.self_influence(train))
    per_module = auto.pairwise_per_module(query, train)
    _close(sum(per_module.values()), reference)


@pytest.mark.parametrize("method", [ik.KFAC, ik.EKFAC])
def test_state_round_trip_and_padding_changes_nothing(method, tmp_path):
    target, train, _ = _bert_kinds_problem()
    fitted = method("auto", kinds="all").fit(ik.Curvature(target, train), stationarity=False)
    extra = {k: torch.nn.functional.pad(v, (0, 3)) if v.dim() == 2 else v
             for k, v in train.items()}
    again = method("auto", kinds="all").fit(ik.Curvature(target, extra), stationarity=False)
    g = torch.randn(2, target.num_params, dtype=F64, generator=torch.Generator().manual_seed(3))
    _close(again.solve(g), fitted.solve(g), rtol=1e-10)       # 3 more padding tokens: no change
    save_inverse(tmp_path / "inv", fitted)
    loaded = load_inverse(tmp_path / "inv", target)
    assert loaded.get_config() == fitted.get_config()
    assert loaded.get_config()["kinds"] == "all"
    torch.testing.assert_close(loaded.solve(g), fitted.solve(g), rtol=0, atol=0)
    torch.testing.assert_close(loaded.damping_vector_(), fitted.damping_vector_(), rtol=0,
                               atol=0)
    idx = _module_blocks(target)
    vector = fitted.damping_vector_()
    dampings = list(fitted.fit_info_["damping"].values())
    assert sorted(float(vector[i[0]]) for i in idx) == pytest.approx(sorted(dampings))


def test_unsupported_cases_raise_clear_errors():
    gpt2 = tiny_gpt2()
    data = lm_data(3, seed=5)
    tied = ik.Target(gpt2, ik.CausalLMTask(), params=["transformer.wte.weight"])
    with pytest.raises(UnsupportedModuleError, match="tied.*transformer.h"):
        ik.KFAC(DAMPING, kinds="all").fit(ik.Curvature(tied, data), stationarity=False)
    with pytest.raises(UnsupportedModuleError, match="kinds="):
        ik.KFAC(DAMPING).fit(ik.Curvature(ik.Target(gpt2, ik.CausalLMTask(),
                                                    params=["transformer.ln_f"]), data))
    positions = ik.Target(gpt2, ik.CausalLMTask(), params=["transformer.wpe.weight"])
    with pytest.raises(UnsupportedModuleError, match="transformer.wpe.*out of the Target"):
        ik.KFAC(DAMPING, kinds="all").fit(ik.Curvature(positions, data), stationarity=False)
    with pytest.raises(InfluenceKitError, match="kinds="):
        ik.KFAC(DAMPING, kinds=["batchnorm"]).fit(ik.Curvature(positions, data))


def test_tied_embedding_in_its_own_diagonal_block_as_the_error_says():
    """The fix the tied-weight error names: the tied table in a Diagonal block, K-FAC for the
    rest (norms included) — factored scores = flat scores."""
    target = ik.Target(tiny_gpt2(), ik.CausalLMTask(),
                       params=["transformer.wte.weight", "transformer.h.1.ln_2",
                               "transformer.h.1.mlp", "transformer.ln_f"])
    train, query = lm_data(6, seed=3), lm_data(2, seed=4)
    inverse = ik.block_diagonal({"transformer.wte.weight": ik.Diagonal(DAMPING)},
                                default=ik.EKFAC(DAMPING, kinds="all"))
    inverse.fit(ik.Curvature(target, train), stationarity=False)
    _close(ik.Influence(target, inverse).pairwise(query, train),
           ik.Influence(target, inverse, path="flat").pairwise(query, train))


class _NormNet(nn.Module):
    """Embedding (padding index 0) → RMSNorm over tokens → mean → LayerNorm → Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.norm = nn.RMSNorm(4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.ln(torch.tanh(self.norm(self.emb(ids))).mean(dim=1)))


def _norm_net_problem(n=7):
    torch.manual_seed(0)
    model = _NormNet().double()
    with torch.no_grad():  # away from the initial ones / zeros
        for name in ("norm", "ln"):
            for p in getattr(model, name).parameters():
                p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (n, 5), generator=gen)
    return model, (ids, torch.randint(0, 3, (n,), generator=gen))


def test_rmsnorm_block_is_exact_and_everything_else_is_consistent(tmp_path):
    """RMSNorm and LayerNorm blocks = the dense GGN blocks; with every layer (embedding with a
    padding index, norms, Linear) and per-layer "auto" damping, solve inverts
    matrix() + diag(damping_vector_()), factored scores = flat scores, and a fit written to a
    FitStore equals the plain fit."""
    model, data = _norm_net_problem()
    norms = ik.Target(model, ik.ClassificationTask(), params=["norm", "ln"])
    curvature = ik.Curvature(norms, data)
    blocks = _block_diagonal(curvature.dense(), norms)
    g = torch.randn(3, norms.num_params, dtype=F64, generator=torch.Generator().manual_seed(4))
    for method in (ik.KFAC, ik.EKFAC):
        fitted = method(DAMPING, kinds=["rmsnorm", "layernorm"]).fit(curvature,
                                                                      stationarity=False)
        assert [layer.kind for layer in fitted.layers_] == ["rmsnorm", "layernorm"]
        _close(fitted.solve(g), _damped_solve(blocks, DAMPING, g), rtol=1e-9)

    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
    curvature = ik.Curvature(target, data)
    g = torch.randn(3, target.num_params, dtype=F64, generator=torch.Generator().manual_seed(5))
    query = (data[0][:2].flip(1), data[1][:2])
    for method in (ik.KFAC, ik.EKFAC):
        fitted = method("auto", kinds="all").fit(curvature, stationarity=False)
        shifted = fitted.matrix() + torch.diag(fitted.damping_vector_())
        _close(fitted.solve(g @ shifted), g, rtol=1e-8)
        _close(ik.Influence(target, fitted).pairwise(query, data),
               ik.Influence(target, fitted, path="flat").pairwise(query, data))
        stored = method("auto", kinds="all").fit(curvature, store=tmp_path / method.__name__,
                                                 stationarity=False)
        torch.testing.assert_close(stored.solve(g), fitted.solve(g), rtol=1e-12, atol=0)
