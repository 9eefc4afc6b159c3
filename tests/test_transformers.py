"""Stock Hugging Face models (tiny BERT, tiny GPT-2 built from configs) with padded dict batches
of uneven length go through the library without a wrapper; every number is checked against an
independent computation (a per-example autograd loop, a dense exact solve, hand formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

import influencekit as ik
from influencekit.func import per_example_gradients_loop
from influencekit.grads import GradientEngine, gradients

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


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def _loop_grads(target, batch, of="loss"):
    fn = target.losses if of == "loss" else target.measurements
    _, grads = per_example_gradients_loop(fn, target.params(), batch)
    return target.space.flatten(grads, batch_dims=1)


def _engine_grads(target, batch, engine, of="loss"):
    _, grads = GradientEngine(target, engine)(target.params(), batch, of)
    return target.space.flatten(grads, batch_dims=1)


# -- per-example gradients ---------------------------------------------------------------------
def test_bert_per_example_gradients_hooks_equal_loop_all_parameters():
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask())
    batch = classification_data(5, seed=1)
    loop = _loop_grads(target, batch)
    auto = _engine_grads(target, batch, "auto")
    torch.testing.assert_close(auto, loop, rtol=1e-8, atol=1e-10)
    engine = GradientEngine(target, "auto")
    engine(target.params(), batch)
    # position ids are shared by the batch ([1, T]): that table's output is expanded per
    # example, so every parameter stays on hooks
    assert engine.rest == [] and engine.expanded == {"bert.embeddings.position_embeddings"}
    with pytest.raises(ik.errors.InfluenceKitError, match="engine='vmap' cannot trace"):
        _engine_grads(target, batch, "vmap")


def test_gpt2_per_example_gradients_vmap_hooks_loop_agree():
    """Eager attention is traceable by vmap, so all three engines can be compared."""
    model = tiny_gpt2(attn="eager")
    target = ik.Target(model, ik.CausalLMTask())
    batch = lm_data(4, seed=2)
    loop = _loop_grads(target, batch)
    for engine in ("vmap", "auto"):
        torch.testing.assert_close(_engine_grads(target, batch, engine), loop, rtol=1e-8,
                                   atol=1e-10, msg=engine)
    linear = ik.Target(model, ik.CausalLMTask(),
                       params=lambda n, p: ".attn." in n or ".mlp." in n)
    torch.testing.assert_close(_engine_grads(linear, batch, "hooks"), _loop_grads(linear, batch),
                               rtol=1e-8, atol=1e-10)


def test_padding_changes_nothing():
    """The same sequences padded to two lengths: identical losses, gradients and scores."""
    sequences = random_sequences(4, seed=3)
    labels = torch.tensor([0, 2, 1, 2])
    short = {**padded(sequences), "labels": labels}
    long = {**padded(sequences, length=12), "labels": labels}
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=BERT_LAST)
    g_short, g_long = gradients(target, short), gradients(target, long)
    torch.testing.assert_close(g_long, g_short, rtol=1e-9, atol=1e-12)
    gpt = ik.Target(tiny_gpt2(), ik.CausalLMTask())
    torch.testing.assert_close(gradients(gpt, padded(sequences, 12)),
                               gradients(gpt, padded(sequences)), rtol=1e-9, atol=1e-12)
    for method in (ik.EKFAC(DAMPING), ik.Exact(DAMPING)):
        scores = [ik.Influence(target, method.clone().fit(ik.Curvature(target, data)))
                  .pairwise(data, data) for data in (short, long)]
        torch.testing.assert_close(scores[1], scores[0], rtol=1e-8, atol=1e-10)


# -- tasks -----------------------------------------------------------------------------------------
def test_causal_lm_loss_and_completion_measurement_by_hand():
    model = tiny_gpt2()
    batch = lm_data(3, seed=4, length=7)
    logits = model(**batch).logits.detach()
    logp = logits.log_softmax(-1)
    mask = batch["attention_mask"].bool()
    expected = torch.tensor([
        -sum(float(logp[i, t, batch["input_ids"][i, t + 1]]) for t in range(6)
             if mask[i, t + 1]) for i in range(3)], dtype=F64)
    target = ik.Target(model, ik.CausalLMTask())
    torch.testing.assert_close(target.losses(target.params(), batch), expected.to(F64))
    # completion given prompt: the first two tokens are the prompt (labels -100)
    labels = batch["input_ids"].masked_fill(~mask, -100)
    labels[:, :2] = -100
    query = {**batch, "labels": labels}
    completion = torch.tensor([
        sum(float(logp[i, t, batch["input_ids"][i, t + 1]]) for t in range(1, 6)
            if mask[i, t + 1]) for i in range(3)], dtype=F64)
    logprob = ik.Target(model, ik.CausalLMTask(measurement="log_probability"))
    torch.testing.assert_close(logprob.measurements(logprob.params(), query), completion.to(F64))
    torch.testing.assert_close(target.measurements(target.params(), query), -completion.to(F64))


def test_sequence_classification_dict_batch_matches_model():
    model = tiny_bert()
    batch = classification_data(4, seed=5)
    target = ik.Target(model, ik.SequenceClassificationTask())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(target.losses(target.params(), batch), expected.detach())


# -- curvature ---------------------------------------------------------------------------
def _enumerated_lm_fisher(target, batch):
    """Σ_t Σ_c p_tc g_t(c) g_t(c)ᵀ per sequence (the exact Fisher of a per-token cross-entropy:
    labels of different positions are independent given the teacher-forced logits), by autograd
    one token and class at a time."""
    flat = target.flat_params()
    p = flat.numel()
    total = torch.zeros(p, p, dtype=F64)
    n = batch["input_ids"].shape[0]
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        mask = one["attention_mask"][0].bool()
        for t in range(one["input_ids"].shape[1] - 1):
            if not mask[t + 1]:
                continue

            def token_logits(f, t=t, one=one):
                return target.outputs(target.space.unflatten(f), one)[0, t]
            logits = token_logits(flat)
            jac = torch.func.jacrev(token_logits)(flat)                 # [V, p]
            probs = logits.softmax(-1).detach()
            hess = torch.diag(probs) - torch.outer(probs, probs)        # ∇²CE in the logits
            total += jac.T @ hess @ jac
    return total / n


def test_lm_curvature_ggn_equals_enumerated_fisher_and_sampled_fisher_estimates_it():
    model = tiny_gpt2()
    target = ik.Target(model, ik.CausalLMTask(), params=["transformer.h.1.mlp.c_proj.weight"])
    batch = lm_data(3, seed=6, length=5)
    exact = _enumerated_lm_fisher(target, batch)
    ggn = ik.Curvature(target, batch).dense()  # the task's default curvature: "ggn"
    torch.testing.assert_close(ggn, exact, rtol=1e-8, atol=1e-12)
    # K-FAC's labels="exact" is allowed for a small vocabulary now (one backward pass per
    # (position, token)); tests/test_lm_exact_labels.py checks it against the exact GGN
    sampled = ik.Curvature(target, batch, kind="fisher", n_samples=300, seed=1).dense()
    again = ik.Curvature(target, batch, kind="fisher", n_samples=300, seed=1).dense()
    assert torch.equal(sampled, again)  # seeded: the same draws every time
    # unbiased: the Monte-Carlo error of 300 draws per token is ~1/sqrt(300) of the matrix
    assert float((sampled - exact).norm() / exact.norm()) < 3 / math.sqrt(300)


def test_kfac_token_mask_makes_the_factorisation_exact():
    """One real token padded to length 5: K-FAC of an encoder Linear equals the exact damped GGN
    block only when the padding is masked out of the activation statistics."""
    model = tiny_bert()
    data = {**padded([[3]], length=5), "labels": torch.tensor([1])}
    layer = "bert.encoder.layer.1.intermediate.dense"
    target = ik.Target(model, ik.SequenceClassificationTask(),
                       params=[f"{layer}.weight", f"{layer}.bias"])
    curvature = ik.Curvature(target, data, kind="ggn")
    lam = 1e-3 * float(torch.linalg.eigvalsh(curvature.dense())[-1])  # this block is ~1e-8
    exact = ik.Exact(lam).fit(curvature)
    g = torch.randn(3, target.num_params, dtype=F64)
    for method in (ik.KFAC(lam), ik.EKFAC(lam)):
        fitted = method.fit(curvature)
        torch.testing.assert_close(fitted.solve(g), exact.solve(g), rtol=1e-7, atol=0)

    class NoMask(ik.SequenceClassificationTask):
        def token_mask(self, batch):
            return None

    unmasked = ik.Target(model, NoMask(), params=target.space.names)
    wrong = ik.KFAC(lam).fit(ik.Curvature(unmasked, data, kind="ggn"))
    err = (wrong.solve(g) - exact.solve(g)).norm() / exact.solve(g).norm()
    assert float(err) > 0.1  # padding in the statistics is far off


# -- every method, no wrapper ------------------------------------------------------------------
def _bert_problem(n_train=8, n_query=3):
    model = tiny_bert()
    target = ik.Target(model, ik.SequenceClassificationTask(), params=BERT_LAST,
                       regularizer=ik.L2Regularizer(1e-2))
    return model, target, classification_data(n_train, seed=7), classification_data(n_query, 8)


def _dense_scores(target, train, query, damping):
    """g_qᵀ (G + λI)⁻¹ g_m with G built from an explicit per-example Jacobian loop."""
    curvature = ik.Curvature(target, train, kind="ggn").dense()
    eye = torch.eye(curvature.shape[0], dtype=F64)
    g_train = _loop_grads(target, train) + _reg_grad(target)
    g_query = _loop_grads(target, query, of="measurement")
    return g_query @ torch.linalg.solve(curvature + damping * eye, g_train.T)


def _reg_grad(target):
    return target.space.flatten(torch.func.grad(target.regularization)(target.params()))


def test_bert_every_inverse_scores_without_a_wrapper():
    model, target, train, query = _bert_problem()
    before = _state(model)
    reference = _dense_scores(target, train, query, DAMPING)
    curvature = ik.Curvature(target, train, kind="ggn")
    for method in (ik.Exact(DAMPING), ik.CG(DAMPING, tol=1e-10, max_iter=500)):
        scores = ik.Influence(target, method.fit(curvature)).pairwise(query, train)
        torch.testing.assert_close(scores, reference, rtol=1e-6, atol=1e-8)
    block_exact = ik.block_diagonal(default=ik.Exact(DAMPING)).fit(curvature)
    for method in (ik.KFAC(DAMPING), ik.EKFAC(DAMPING), ik.EKFAC("auto")):
        fitted = method.fit(curvature)
        scores = ik.Influence(target, fitted).pairwise(query, train)
        assert scores.shape == (3, 8) and torch.isfinite(scores).all()
        # K-FAC family vs the exact per-layer curvature: same sign structure on this model
        exact_layer = ik.Influence(target, block_exact).pairwise(query, train)
        assert float(torch.corrcoef(torch.stack([scores.flatten(),
                                                 exact_layer.flatten()]))[0, 1]) > 0.5
    _assert_unchanged(model, before)


def test_bert_tracin_and_trak_equal_their_formulas():
    model, target, train, query = _bert_problem()
    before = _state(model)
    theta = target.flat_params()
    tracin = ik.TracIn(target, [theta, theta * 0.9], learning_rates=[0.5, 0.25])
    expected = 0.0
    for eta, ckpt in ((0.5, theta), (0.25, theta * 0.9)):
        at = ik.Target(model, target.task, params=list(target.space.names),
                       regularizer=target.regularizer)
        saved = at.flat_params()
        ik.write_params(at, ckpt)
        g_q = _loop_grads(at, query, of="measurement")
        g_m = _loop_grads(at, train) + _reg_grad(at)
        ik.write_params(at, saved)
        expected = expected + eta * g_q @ g_m.T
    torch.testing.assert_close(tracin.pairwise(query, train), expected, rtol=1e-8, atol=1e-10)
    trak = ik.TRAK(target, damping=1e-3, measurement="loss")
    phi = _loop_grads(target, train)
    phi_q = _loop_grads(target, query)
    kernel = phi.T @ phi / phi.shape[0] + 1e-3 * torch.eye(phi.shape[1], dtype=F64)
    torch.testing.assert_close(trak.pairwise(query, train),
                               phi_q @ torch.linalg.solve(kernel, phi.T), rtol=1e-7, atol=1e-9)
    _assert_unchanged(model, before)


def test_diagnostics_check_runs_with_auto_damping_and_block_diagonal():
    model, target, train, query = _bert_problem(n_train=6, n_query=2)
    before = _state(model)
    curvature = ik.Curvature(target, train, kind="ggn")
    for inverse in (ik.EKFAC("auto").fit(curvature),
                    ik.block_diagonal({"classifier": ik.Exact(DAMPING)},
                                      default=ik.KFAC(DAMPING)).fit(curvature)):
        report = ik.diagnostics.check(target, inverse, train, query,
                                      include=("numeric stability",))
        residual = next(f for f in report.findings if f.name == "solver residual")
        # K-FAC is not the exact inverse: its residual against the true C is measured, finite
        assert math.isfinite(residual.value) and residual.value > 1e-6
        lam = inverse.damping_vector_()
        assert lam.shape == (target.num_params,) and bool((lam > 0).all())
    _assert_unchanged(model, before)


def test_fix_prediction_on_bert_with_dict_query():
    model, target, train, query = _bert_problem(n_train=12)
    before = _state(model)
    inverse = ik.Exact(DAMPING).fit(ik.Curvature(target, train, kind="ggn"))
    query_x = {"input_ids": query["input_ids"][0], "attention_mask": query["attention_mask"][0]}
    logits = model(input_ids=query["input_ids"][:1],
                   attention_mask=query["attention_mask"][:1]).logits
    desired = int(logits.argmin())
    fix = ik.correction.fix_prediction(target, inverse, train, query_x, desired, k=4, steps=5,
                                       lr=0.5, optimizer="normalized")
    # the real loss change beside its first-order forecast, both from the fine-tuned copy
    assert fix.steps >= 1 and fix.query_loss_after < fix.query_loss_before
    moved = fix.params - target.flat_params()
    assert float(moved.norm()) == pytest.approx(0.5 * fix.steps, rel=1e-9)  # normalized steps
    _assert_unchanged(model, before)
