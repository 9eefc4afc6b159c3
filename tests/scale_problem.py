"""Small float64 problems shared by the scale tests and the torchrun worker they launch
(tests/scale_dist_worker.py). The problem of the score-store worker killed with SIGKILL is the
same ``build_problem`` (:mod:`influencekit.testing.workers`).

Scripts import it as ``scale_problem`` (their folder is on ``sys.path``), tests as
``.scale_problem``; both build the same model, data and fitted inverse from fixed seeds.
"""

import torch
from torch import nn

import influencekit as ik
from influencekit.testing.workers import score_problem

build_problem = score_problem  # one definition, shared with the fault-injection worker


def build_kfac_problem(n_train=23, n_query=5, widths=(6, 8, 8, 3), seed=1):
    """``(target, train, query, weights)``: a float64 three-layer tanh MLP (three K-FAC layers
    of different sizes, so that their eigendecompositions can go to three processes) with an
    L2 regulariser, and positive per-example weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_query, widths[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, widths[-1], (n_train + n_query,), generator=g)
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    target = ik.Target(model, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    weights = 0.5 + torch.rand(n_train, generator=g, dtype=torch.float64)
    return target, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), weights


def sharded_fits(runtime, store=None):
    """What the torchrun test compares between 1, 2 and 3 processes, computed under
    ``runtime`` (batches of 5: 23 examples in 5 batches, uneven shares): ``{name: tensor}``.

    K-FAC and EK-FAC (exact and sampled labels) fitted state and raw factors, the reduced
    example count, the weighted dense GGN, curvature-vector products, CG (a solve and scores)
    and LiSSA, EK-FAC scores (also streamed), self-influence and gradients, TRAK scores. With
    ``store`` (a folder): only the K-FAC and EK-FAC fits written to fit stores there (their
    state, to compare bit for bit)."""
    from influencekit.curvature.kfac import kronecker_factors
    from influencekit.curvature.labels import LabelSets
    from influencekit.grads import find_layers

    target, train, query, weights = build_kfac_problem()
    curvature = ik.Curvature(target, train, kind="ggn")
    out = {}
    if store is not None:
        for cls in (ik.KFAC, ik.EKFAC):
            fitted = cls(damping=1e-2).fit(curvature, runtime, store=f"{store}/{cls.__name__}")
            out.update({f"{cls.__name__}/{k}": v for k, v in fitted.state_dict().items()})
        return out
    layers = find_layers(target, None, ("linear",))
    factors = kronecker_factors(curvature, runtime, layers, LabelSets("exact"))
    for name, (a, s) in factors.items():
        out[f"factors/A/{name}"], out[f"factors/S/{name}"] = a, s
    for cls in (ik.KFAC, ik.EKFAC):
        fitted = cls(damping=1e-2).fit(curvature, runtime)
        out[f"{cls.__name__}/matrix"] = fitted.matrix()
        out[f"{cls.__name__}/n_examples"] = torch.tensor([fitted.fit_info_["n_examples"]])
        out.update({f"{cls.__name__}/{k}": v for k, v in fitted.state_dict().items()})
    sampled = ik.KFAC(damping=1e-2, labels="sampled", n_samples=2, seed=3).fit(curvature,
                                                                               runtime)
    out["sampled/matrix"] = sampled.matrix()
    ekfac = ik.EKFAC(damping=1e-2).fit(curvature, runtime)
    influence = ik.Influence(target, ekfac)
    out["scores"] = influence.pairwise(query, train, runtime)
    out["self_influence"] = influence.self_influence(train, runtime)
    out["gradients"] = ik.grads.gradients(target, train, runtime)
    out["trak"] = ik.TRAK(target, damping=1e-2).pairwise(query, train, runtime)
    # streaming under the runtime's context: blocks of 12 (2 blocks: with 3 processes one has
    # none, yet takes part in the sharded preconditioning)
    top = ik.stream_scores(influence, query, train, k=3, block_size=12, runtime=runtime).top_k
    out["stream_helpful"], out["stream_harmful"] = top.helpful_scores, top.harmful_scores
    weighted = ik.Curvature(target, train, kind="ggn", weights=weights)
    out["dense"] = weighted.dense(runtime)
    v = torch.linspace(-1, 1, 2 * target.num_params, dtype=torch.float64).reshape(2, -1)
    out["matvec"] = weighted.matvec(v, runtime)
    fisher = ik.Curvature(target, train, kind="fisher", n_samples=2, seed=5)
    out["sampled_fisher_matvec"] = fisher.matvec(v, runtime)
    # four CG iterations exactly (each a sharded product), and LiSSA on seeded minibatches
    cg = ik.CG(damping=1e-2, max_iter=4, tol=1e-300, on_failure="ignore").fit(weighted, runtime)
    out["cg"] = cg.solve(v, runtime)
    out["cg_scores"] = ik.Influence(target, cg).pairwise(query, train, runtime)
    lissa = ik.LiSSA(damping=1e-2, n_iter=3, minibatch_size=11, seed=2).fit(weighted, runtime)
    out["lissa"] = lissa.solve(v, runtime)
    return out
