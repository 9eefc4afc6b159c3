"""Factored scoring (scores from each layer's activations and output gradients, never [B, p])
against the flat path (per-example gradients [B, p], the reference), on the tiny GPT-2 and BERT
of the boundary tests and on small MLP / conv models, all in float64. Token-wise scores are
also checked against an independent autograd perturbation, query-token scores against queries
whose labels keep a single token."""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import InfluenceKitError
from influencekit.func.params import ParamSpace
from influencekit.grads import layer_matrix
from influencekit.scoring import factored, query_rank_correlation

from .transformer_models import (
    F64,
    classification_data,
    lm_data,
    padded,
    random_sequences,
    tiny_bert,
    tiny_gpt2,
)

DAMPING = 1e-2
BERT_LAST = ["bert.encoder.layer.1.output.dense", "bert.pooler.dense", "classifier"]


def _gpt2_blocks(model, reg=True):
    """The Conv1D layers (attention and MLP) of GPT-2's last block, with an L2 regulariser."""
    return ik.Target(model, ik.CausalLMTask(),
                     params=["transformer.h.1.attn", "transformer.h.1.mlp"],
                     regularizer=ik.L2Regularizer(1e-2) if reg else None)


def _close(got, expected, rtol=1e-8):
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def gpt2_problem():
    model = tiny_gpt2()
    target = _gpt2_blocks(model)
    train, query = lm_data(9, seed=1), lm_data(3, seed=2)
    curvature = ik.Curvature(target, train)
    inverses = {"KFAC": ik.KFAC(DAMPING).fit(curvature),
                "EKFAC": ik.EKFAC(DAMPING).fit(curvature),
                "block_diagonal": ik.block_diagonal(default=ik.Exact(DAMPING)).fit(curvature)}
    return target, train, query, inverses


# -- factored = flat ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["KFAC", "EKFAC", "block_diagonal"])
def test_gpt2_factored_scores_equal_flat(gpt2_problem, method):
    target, train, query, inverses = gpt2_problem
    inverse = inverses[method]
    auto, flat = ik.Influence(target, inverse), ik.Influence(target, inverse, path="flat")
    assert auto.factored and not flat.factored
    reference = flat.pairwise(query, train)
    _close(auto.pairwise(query, train), reference)
    per_module, per_module_flat = (s.pairwise_per_module(query, train) for s in (auto, flat))
    assert per_module.keys() == per_module_flat.keys()
    for name, value in per_module.items():
        _close(value, per_module_flat[name])
    _close(sum(per_module.values()), reference)                    # layer-wise sums = totals
    _close(auto.self_influence(train), flat.self_influence(train))


def test_bert_factored_scores_equal_flat():
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=BERT_LAST,
                       regularizer=ik.L2Regularizer(1e-2))
    train, query = classification_data(8, seed=7), classification_data(3, seed=8)
    curvature = ik.Curvature(target, train)
    for inverse in (ik.KFAC(DAMPING), ik.EKFAC(DAMPING),
                    ik.block_diagonal(default=ik.Exact(DAMPING))):
        inverse.fit(curvature)
        reference = ik.Influence(target, inverse, path="flat").pairwise(query, train)
        _close(ik.Influence(target, inverse).pairwise(query, train), reference)


def test_gpt2_all_parameters_embeddings_tied_norms_and_flat_rest():
    """Every GPT-2 parameter: token and position embeddings (the output layer tied to the token
    embedding; position ids shared by the batch, so that table's output is expanded per
    example), LayerNorms, Conv1D — per-layer exact blocks and a diagonal inverse."""
    model = tiny_gpt2(attn="eager")
    target = ik.Target(model, ik.CausalLMTask(), regularizer=ik.L2Regularizer(1e-2))
    train, query = lm_data(6, seed=3), lm_data(2, seed=4)
    curvature = ik.Curvature(target, train)
    inverse = ik.block_diagonal(default=ik.Exact(DAMPING)).fit(curvature)
    scorer = ik.Influence(target, inverse)
    prepared = scorer.prepare_queries(query)
    kinds = {type(t).__name__ for t in prepared.terms}
    assert kinds == {"KroneckerQuery", "DiagonalQuery"}
    assert prepared.rest == [] and prepared.expanded == {"transformer.wpe"}
    reference = ik.Influence(target, inverse, path="flat").pairwise(query, train)
    _close(scorer.pairwise_prepared(prepared, train), reference)
    per_module = scorer.pairwise_per_module(query, train)
    assert "transformer.wte" in per_module  # the tied output layer's part goes to its owner
    _close(sum(per_module.values()), reference)
    diagonal = ik.Diagonal(DAMPING, estimator="dense").fit(curvature)
    _close(ik.Influence(target, diagonal).pairwise(query, train),
           ik.Influence(target, diagonal, path="flat").pairwise(query, train))


def test_mlp_and_conv_factored_equal_flat(monkeypatch):
    """One-token layers (the query-side token path) and Conv2d patches; chunked per-example
    matrices (a tiny chunk size forces several chunks)."""
    monkeypatch.setattr(factored, "CHUNK_ELEMENTS", 7)
    gen = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(11, 4, dtype=F64, generator=gen), torch.randint(0, 3, (11,), generator=gen)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 16, 3)).double()
    images = torch.randn(11, 1, 4, 4, dtype=F64, generator=gen)
    for model, inputs in ((mlp, x), (conv, images)):
        target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-2))
        train, query = (inputs[:8], y[:8]), (inputs[8:], y[8:])
        curvature = ik.Curvature(target, train)
        for inverse in (ik.EKFAC(DAMPING), ik.KFAC(DAMPING)):
            inverse.fit(curvature)
            for n_query in (1, 3):  # one query: per-token products; three: per-example matrices
                q = (query[0][:n_query], query[1][:n_query])
                _close(ik.Influence(target, inverse).pairwise(q, train),
                       ik.Influence(target, inverse, path="flat").pairwise(q, train))


def test_factored_path_never_flattens_a_batch(gpt2_problem, monkeypatch):
    """No [B, p] (or [n_query, p]) block: flattening with a batch dimension is refused."""
    target, train, query, inverses = gpt2_problem
    expected = ik.Influence(target, inverses["EKFAC"], path="flat").pairwise(query, train)
    original = ParamSpace.flatten

    def no_batches(self, tensors, batch_dims=0):
        assert batch_dims == 0, "a [B, p] block was formed"
        return original(self, tensors, batch_dims)

    monkeypatch.setattr(ParamSpace, "flatten", no_batches)
    got = ik.Influence(target, inverses["EKFAC"]).pairwise(query, train)
    monkeypatch.undo()
    _close(got, expected)


def test_path_choice_and_errors(gpt2_problem):
    target, train, query, inverses = gpt2_problem
    exact = ik.Exact(DAMPING).fit(ik.Curvature(target, train))
    assert not ik.Influence(target, exact).factored
    assert ik.Influence(target, exact, path="factored").factored
    _close(ik.Influence(target, exact, path="factored").pairwise(query, train),
           ik.Influence(target, exact).pairwise(query, train))
    with pytest.raises(InfluenceKitError, match="query_rank needs the factored path"):
        ik.Influence(target, inverses["KFAC"], path="flat", query_rank=2).pairwise(query, train)
    with pytest.raises(InfluenceKitError, match="path="):
        ik.Influence(target, inverses["KFAC"], path="fast").pairwise(query, train)
    with pytest.raises(InfluenceKitError, match="positive integer"):
        ik.Influence(target, inverses["KFAC"], query_rank=0).pairwise(query, train)


# -- token-wise scores ----------------------------------------------------------------------------
def test_train_token_scores_add_up_and_match_a_perturbation(gpt2_problem):
    target, train, query, inverses = gpt2_problem
    inverse = inverses["EKFAC"]
    tokens = ik.Influence(target, inverse).pairwise_per_train_token(query, train)
    reference = ik.Influence(target, inverse, path="flat").pairwise(query, train)
    assert tokens.tokens.shape == (3, 9, train["input_ids"].shape[1])
    _close(tokens.total(), reference)
    padding = ~train["attention_mask"].bool()
    assert float(tokens.tokens[:, padding].abs().max()) == 0.0
    # the rest is the regulariser's part alone (every selected layer runs over the tokens)
    pre = ik.Influence(target, inverse).precondition(query)
    reg = target.flat_params() * 1e-2
    _close(tokens.rest, (pre @ reg)[:, None].expand(-1, 9))


def test_token_contribution_is_the_derivative_along_one_token():
    """δ_tᵀ Q a_t = d loss / dε when ε·Q a_t is added to the layer's output at token t only
    (autograd through the whole model: an independent computation)."""
    model = tiny_gpt2()
    layer = "transformer.h.1.mlp.c_fc"
    target = ik.Target(model, ik.CausalLMTask(), params=[layer])
    train, query = lm_data(4, seed=5), lm_data(1, seed=6)
    inverse = ik.KFAC(DAMPING).fit(ik.Curvature(target, train))
    tokens = ik.Influence(target, inverse).pairwise_per_train_token(query, train).tokens
    pre = target.space.unflatten(ik.Influence(target, inverse).precondition(query))
    spec = inverse.layers_[0]
    q = layer_matrix(spec, pre)[0]                                      # [d_out, d_in + 1]
    module = model.get_submodule(layer)
    for m in range(4):
        one = {k: v[m:m + 1] for k, v in train.items()}
        for t in range(int(one["attention_mask"].sum())):
            eps = torch.zeros((), dtype=F64, requires_grad=True)

            def shift(mod, args, out, t=t, eps=eps):
                x = args[0][:, t]
                bump = torch.zeros_like(out)
                bump[:, t] = x @ q[:, :-1].T + q[:, -1]
                return out + eps * bump

            handle = module.register_forward_hook(shift)
            try:
                loss = target.losses(target.params(), one).sum()
                (derivative,) = torch.autograd.grad(loss, eps)
            finally:
                handle.remove()
            torch.testing.assert_close(tokens[0, m, t], derivative, rtol=1e-8, atol=1e-12)


def test_padding_gives_the_same_token_scores_on_real_tokens_and_zero_elsewhere(gpt2_problem):
    target, _, _, _ = gpt2_problem
    sequences = random_sequences(5, seed=9)
    short, long = padded(sequences), padded(sequences, length=12)
    query = lm_data(2, seed=10)
    inverse = ik.EKFAC(DAMPING).fit(ik.Curvature(target, short))
    scorer = ik.Influence(target, inverse)
    a = scorer.pairwise_per_train_token(query, short)
    b = scorer.pairwise_per_train_token(query, long)
    width = short["input_ids"].shape[1]
    _close(b.tokens[:, :, :width], a.tokens)
    assert float(b.tokens[:, :, width:].abs().max()) == 0.0
    _close(b.rest, a.rest)


def test_bert_token_scores_put_the_head_in_the_rest():
    """Layers on the pooled vector (pooler, classifier) have no token of the sequence."""
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=BERT_LAST)
    train, query = classification_data(6, seed=11), classification_data(2, seed=12)
    inverse = ik.EKFAC(DAMPING).fit(ik.Curvature(target, train))
    scorer = ik.Influence(target, inverse)
    tokens = scorer.pairwise_per_train_token(query, train)
    per_module = scorer.pairwise_per_module(query, train)
    _close(tokens.total(), ik.Influence(target, inverse, path="flat").pairwise(query, train))
    _close(tokens.tokens.sum(-1), per_module["bert.encoder.layer.1.output.dense"])
    _close(tokens.rest, per_module["bert.pooler.dense"] + per_module["classifier"])
    assert float(tokens.tokens[:, ~train["attention_mask"].bool()].abs().max()) == 0.0


def test_query_token_scores_are_single_token_queries(gpt2_problem):
    """Entry τ equals the score of the same query whose labels keep only token τ (the prompt
    and the other tokens set to -100); prompt and padding positions are zero; the tokens add
    up to the query's score."""
    target, train, _, inverses = gpt2_problem
    inverse = inverses["KFAC"]
    query = lm_data(2, seed=13, length=6)
    labels = query["input_ids"].masked_fill(~query["attention_mask"].bool(), -100)
    labels[:, :2] = -100                                                   # a 2-token prompt
    query = {**query, "labels": labels}
    per_token = ik.Influence(target, inverse).pairwise_per_query_token(query, train)
    flat = ik.Influence(target, inverse, path="flat")
    assert per_token.shape == (2, 9, 6)
    _close(per_token.sum(-1), flat.pairwise(query, train))
    for tau in range(6):
        single = labels.clone()
        single[:, [t for t in range(6) if t != tau]] = -100
        expected = flat.pairwise({**query, "labels": single}, train)
        _close(per_token[:, :, tau], expected)
    assert float(per_token[:, :, :2].abs().max()) == 0.0


# -- query batching -------------------------------------------------------------------------------
def test_full_rank_query_batching_equals_unbatched(gpt2_problem):
    target, train, query, inverses = gpt2_problem
    inverse = inverses["EKFAC"]
    reference = ik.Influence(target, inverse).pairwise(query, train)
    full = max(max(layer.d_out, layer.width) for layer in inverse.layers_)
    batched = ik.Influence(target, inverse, query_rank=full)
    prepared = batched.prepare_queries(query)
    assert all(t.full is None for t in prepared.terms)                    # SVD factors only
    _close(batched.pairwise_prepared(prepared, train), reference, rtol=1e-10)
    _close(batched.pairwise_per_train_token(query, train).total(), reference, rtol=1e-10)
    rank1 = ik.Influence(target, inverse, query_rank=1).pairwise(query, train)
    correlations = query_rank_correlation(ik.Influence(target, inverse), query, train, [1, full])
    expected = float(torch.corrcoef(torch.stack([rank1.flatten(), reference.flatten()]))[0, 1])
    assert correlations[1] == pytest.approx(expected, abs=1e-10)
    assert correlations[full] == pytest.approx(1.0, abs=1e-12)
    assert correlations[1] < 0.9999


def test_rank_r_layer_query_is_the_best_rank_r_matrix():
    """Eckart–Young: the factors reproduce the SVD truncation, error = the dropped singular
    values."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 7, dtype=F64, generator=gen)
    left, right = factored.low_rank(q, 2)
    s = torch.linalg.svdvals(q)
    error = torch.linalg.matrix_norm(q - left @ right.transpose(1, 2))
    torch.testing.assert_close(error, s[:, 2:].norm(dim=1))


def test_the_readme_language_model_block_runs_as_written():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Language models"):].split("```python\n", 1)[1]
    block = block.split("```", 1)[0]
    names = {"ik": ik, "gpt2": tiny_gpt2(), "train": lm_data(5, seed=1),
             "query": lm_data(2, seed=2)}
    exec(compile(block, "README.md", "exec"), names)
    scores = names["scores"]
    assert scores.shape == (2, 5)
    _close(names["tokens"].total(), scores)
    _close(names["per_completion_token"].sum(-1), scores)


def test_bfloat16_model_scores_in_float32_within_its_precision():
    """Query gradients in the model's dtype, scores summed in float32: a bfloat16 copy of the
    model scores like the float64 runtime to bfloat16's precision."""
    model = tiny_gpt2().to(torch.bfloat16)
    target = ik.Target(model, ik.CausalLMTask(), params=["transformer.h.1.mlp"])
    train, query = lm_data(6, seed=1), lm_data(2, seed=2)
    inverse = ik.EKFAC(DAMPING).fit(ik.Curvature(target, train))
    scorer = ik.Influence(target, inverse)
    low = scorer.pairwise(query, train)
    high = scorer.pairwise(query, train, ik.Runtime(dtype=torch.float64))
    assert low.dtype == torch.float32 and high.dtype == F64
    assert float((low - high).abs().max() / high.abs().max()) < 0.05   # bf16: 8-bit mantissa


# -- the inverse interface: per-parameter solves (every method of the conformance suite) ---------
def _conformance_cases():
    """Every case of the conformance suite (LiSSA's 150 recursions: slow)."""
    from .test_inverse_conformance import CASES

    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id == "lissa" else [])
            for c in CASES]


@pytest.mark.parametrize("case", _conformance_cases())
def test_solve_per_parameter_equals_solve_block_by_block(case):
    """``solve_per_parameter`` is ``solve`` in per-parameter form (the conformance suite holds
    ``solve`` to the explicit matrix); block-diagonal inverses also solve any block alone."""
    from .inverse_problems import PROBLEMS

    problem = PROBLEMS[case.problem]()
    inverse = case.factory(0.1).fit(problem.curvature)
    space = inverse.param_space_
    g = torch.randn(3, space.numel, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected = space.unflatten(inverse.solve(g))
    got = inverse.solve_per_parameter(space.unflatten(g))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14)
    blocks = inverse.parameter_blocks_()
    if blocks is None:
        return
    assert sorted(n for b in blocks for n in b) == sorted(space.names)   # a partition
    pieces = space.unflatten(g)
    for block in blocks:
        alone = inverse.solve_per_parameter({n: pieces[n] for n in block})
        assert set(alone) == set(block)
        for name in block:
            torch.testing.assert_close(alone[name], expected[name], rtol=1e-12, atol=1e-14)
    if any(len(b) > 1 for b in blocks):
        split = next(b for b in blocks if len(b) > 1)
        with pytest.raises(ValueError, match="whole blocks"):
            inverse.solve_per_parameter({split[0]: pieces[split[0]]})


def test_iter_pairwise_yields_the_score_blocks_in_order(gpt2_problem):
    target, train, query, inverses = gpt2_problem
    scorer = ik.Influence(target, inverses["KFAC"])
    prepared = scorer.prepare_queries(query)
    runtime = ik.Runtime(batch_size=4)
    blocks = list(scorer.iter_pairwise(prepared, train, runtime))
    assert [start for start, _ in blocks] == [0, 4, 8]
    _close(torch.cat([b for _, b in blocks], dim=1), scorer.pairwise(query, train))
