"""What each command does, as functions on a resolved config and a run store.

``fit_run`` / ``score_run`` / ``score_partition`` / ``merge_run`` / ``evaluate_run`` /
``replay_run`` / ``plan_run`` build through
:func:`~influencekit.cli.build.build_run` and the public API, write the store
(:class:`~influencekit.cli.store.RunStore`), and return a :class:`Outcome`: what was computed,
the stage timings and the rows of the summary table the CLI prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import conventions
from ..distributed import Partition
from ..errors import ConfigError, InfluenceKitError, StoreError
from ..report.store import EVALUATION, EXAMPLES, INVERSE, PARTITIONS, SCORES, RunStore
from ..runtime import stage
from ..scoring import Influence
from ..storage import ScoreStore, load_inverse, merge_score_stores, save_inverse
from .build import Run, build_run, compute_scores, compute_self_influence, fit_inverse, take_rows
from .config import fit_part

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a command did: ``rows`` of (stage, seconds, result) for the summary table."""

    command: str
    store: RunStore
    run: Run | None = None
    inverse: Any = None
    scores: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    ok: bool = True
    message: str = ""

    def add(self, name: str, result: str) -> None:
        self.rows.append((name, self.timings.get(name, 0.0), result))

    def finish(self) -> Outcome:
        facts = dict(self.run.facts) if self.run is not None else {}
        facts.update(self.facts)
        self.store.record_command(self.command, self.timings, facts)
        return self


# -- fit ------------------------------------------------------------------------------------------
def fit_run(config: dict, store: RunStore, progress: bool | None = None,
            run: Run | None = None, overwrite: bool = False) -> Outcome:
    """Build, fit the inverse, write ``config.json``, ``inverse/`` and ``run.json``.

    A store holding a run of another fit config is refused unless ``overwrite``."""
    out = Outcome("fit", store)
    store.prepare(config, fit_part, overwrite)
    with stage("build", out.timings):
        out.run = run or build_run(config, progress)
    out.add("build", _describe_run(out.run))
    if not out.run.is_inverse:
        out.rows.append(("fit", 0.0, f"{config['method']['name']} has no fitted state; "
                                     "`score` computes it"))
        return out.finish()
    with stage("fit", out.timings):
        out.inverse = fit_inverse(out.run)
    save_inverse(store.path / INVERSE, out.inverse)
    out.add("fit", f"{out.inverse!r} on {config['curvature']['kind']} -> "
                   f"{store.path / INVERSE}")
    return out.finish()


def fitted_inverse(config: dict, store: RunStore, run: Run, out: Outcome):
    """The store's inverse (fitted for this config: ``RunStore.prepare`` checked) and this
    model, else a fresh fit written to the store."""
    if store.has(INVERSE):
        with stage("load inverse", out.timings):
            inverse = load_inverse(store.path / INVERSE, run.target)
            if hasattr(inverse, "attach"):
                inverse.attach(run.curvature, run.runtime)
        out.add("load inverse", f"{inverse!r} from {store.path / INVERSE}")
        return inverse
    with stage("fit", out.timings):
        inverse = fit_inverse(run)
    save_inverse(store.path / INVERSE, inverse)
    out.add("fit", f"{inverse!r} -> {store.path / INVERSE}")
    return inverse


# -- score ----------------------------------------------------------------------------------------
def score_run(config: dict, store: RunStore, progress: bool | None = None,
              run: Run | None = None, inverse=None, overwrite: bool = False) -> Outcome:
    """Scores of every training example on every query, written to ``scores/`` and
    ``examples/`` (top-k per query always; the full matrix when ``score.top_k`` is 0)."""
    out = Outcome("score", store)
    store.prepare(config, fit_part, overwrite)
    with stage("build", out.timings):
        out.run = run or build_run(config, progress)
    out.add("build", _describe_run(out.run))
    if out.run.is_inverse:
        out.inverse = inverse if inverse is not None else fitted_inverse(config, store,
                                                                         out.run, out)
    with stage("score", out.timings):
        out.scores = compute_scores(out.run, out.inverse)
    tensors, manifest = score_tensors(out.run, out.scores, config, out.inverse)
    if config["score"]["self_influence"]:
        with stage("self-influence", out.timings):
            tensors["self_influence"] = compute_self_influence(out.run, out.inverse)
        out.add("self-influence", f"[{out.run.facts['n_train']}]")
    store.write(SCORES, tensors, manifest)
    kept = "full matrix" if "scores" in tensors else f"top {config['score']['top_k']}"
    out.add("score", f"{tuple(out.scores.shape)} scores ({kept}) -> {store.path / SCORES}")
    example_tensors, example_manifest = examples_of(out.run, tensors)
    if wants_token_scores(out.run, out.inverse):
        with stage("token scores", out.timings):
            tokens, token_manifest = token_score_tensors(out.run, out.inverse, tensors,
                                                         config["report"]["top"])
        tensors.update(tokens)
        manifest.update(token_manifest)
        store.write(SCORES, tensors, manifest)
        out.add("token scores", f"{len(tokens['token_pairs'])} (query, train) pairs")
    store.write(EXAMPLES, example_tensors, example_manifest)
    out.facts["scores_sha256"] = _sha(out.scores)
    return out.finish()


# -- partitions and their merge -------------------------------------------------------------------
MERGED = "merged"


def partition_folder(store: RunStore, partition: Partition) -> Path:
    """``STORE/partitions/I-of-N``: where ``score --partition I/N`` writes its partial store."""
    return store.path / PARTITIONS / f"{partition.index}-of-{partition.count}"


def score_partition(config: dict, store: RunStore, partition: Partition | str,
                    progress: bool | None = None) -> Outcome:
    """Scores of one partition of the training examples into a partial score store
    (:func:`partition_folder`), with the store's fitted inverse; resumes a killed run.

    Nothing else in the store is written, so the jobs of a job array can share it; ``merge``
    combines the partitions into ``scores/`` afterwards.
    """
    from ..scoring import Influence, stream_scores

    partition = Partition.parse(partition)
    out = Outcome("score", store)
    if not store.has(INVERSE):
        raise StoreError(f"{store.path} holds no fitted inverse: run `influencekit fit CONFIG "
                         f"--store {store.path}` once before the partitions, so that every "
                         "partition scores with the same inverse.")
    if fit_part(store.config()) != fit_part(config):
        raise StoreError(f"{store.path} was fitted with another config; partitions score with "
                         "the store's own config (leave out CONFIG, or fit again).")
    with stage("build", out.timings):
        out.run = run = build_run(config, progress)
    out.add("build", _describe_run(run))
    if not run.is_inverse:
        raise ConfigError("method.name", config["method"]["name"], "an inverse (Exact, CG, "
                          "LiSSA, Arnoldi, KFAC, EKFAC, Diagonal, Identity, block_diagonal): "
                          "TracIn and TRAK do not score in partitions")
    out.inverse = fitted_inverse(config, store, run, out)
    folder = partition_folder(store, partition)
    with stage("score partition", out.timings):
        result = stream_scores(Influence(run.target, out.inverse), run.query, run.train,
                               store=folder, partition=partition,
                               block_size=run.runtime.batch_size, store_dtype="float64",
                               runtime=run.runtime)
    columns = result.store.columns
    out.add("score partition", f"training examples {columns.start}..{columns.stop - 1} of "
                               f"{result.store.n_train} ({result.blocks_computed} blocks "
                               f"computed) -> {folder}")
    return out  # run.json is left alone: jobs of one array would race to write it


def merge_run(store: RunStore, progress: bool | None = None, parts=None) -> Outcome:
    """Merge the partial stores (default: every folder in ``STORE/partitions`` but
    ``merged``) into ``partitions/merged`` and write ``scores/`` and ``examples/`` as `score`
    would have. Refuses missing, duplicate, incomplete or foreign partitions."""
    config = store.config()
    out = Outcome("merge", store)
    if parts is None:
        root = store.path / PARTITIONS
        parts = sorted(p for p in root.iterdir() if p.is_dir() and p.name != MERGED) \
            if root.is_dir() else []
    if not parts:
        raise StoreError(f"{store.path} holds no partial score store in {PARTITIONS}/: run "
                         f"`influencekit score --store {store.path} --partition I/N` for every "
                         "I of N first.")
    with stage("merge", out.timings):
        merged = merge_score_stores(parts, store.path / PARTITIONS / MERGED)
    out.add("merge", f"{len(parts)} partitions -> {merged.folder}")
    with stage("build", out.timings):
        out.run = run = build_run(config, progress)
    out.add("build", _describe_run(run))
    if merged.manifest["model_fingerprint"] != run.target.fingerprint():
        raise StoreError("the model factory built a model with other parameter values than "
                         "the partitions were scored with (training is not deterministic, or the "
                         "factory changed); score the partitions again.")
    out.inverse = fitted_inverse(config, store, run, out)
    out.scores = merged.scores().to(torch.float64)
    tensors, manifest = score_tensors(run, out.scores, config, out.inverse)
    if config["score"]["self_influence"]:
        with stage("self-influence", out.timings):
            tensors["self_influence"] = compute_self_influence(run, out.inverse)
        out.add("self-influence", f"[{run.facts['n_train']}]")
    store.write(SCORES, tensors, manifest)
    example_tensors, example_manifest = examples_of(run, tensors)
    store.write(EXAMPLES, example_tensors, example_manifest)
    kept = "full matrix" if "scores" in tensors else f"top {config['score']['top_k']}"
    out.rows.append(("scores", 0.0, f"{tuple(out.scores.shape)} ({kept}) -> "
                                    f"{store.path / SCORES}"))
    out.facts["scores_sha256"] = _sha(out.scores)
    out.facts["partitions"] = len(parts)
    return out.finish()


# -- plan ----------------------------------------------------------------------------------------
PLANNED_METHODS = {"Exact": "flat", "KFAC": "kfac", "EKFAC": "ekfac"}


def plan_run(config: dict, progress: bool | None = None, *, n_train: int | None = None,
             n_query: int | None = None, memory_budget: int | None = None,
             max_job_seconds: float | None = None, batch_size: int | None = None,
             sample_size: int = 64):
    """``(outcome, plan)``: :func:`influencekit.plan` of the config's run, calibrated on its
    first ``sample_size`` training examples; ``n_train`` / ``n_query`` default to the config's
    data (give the full run's sizes to plan it from a sample)."""
    from ..curvature.labels import resolve_label_mode
    from ..planner import plan

    name = config["method"]["name"]
    if name not in PLANNED_METHODS:
        raise ConfigError("method.name", name, "Exact, KFAC or EKFAC (the planner estimates "
                          "dense and Kronecker-factored runs; plan with --method KFAC, say)")
    out = Outcome("plan", RunStore(config["store"] or "."))
    with stage("build", out.timings):
        run = build_run(config, progress)
    out.add("build", _describe_run(run))
    method = PLANNED_METHODS[name]
    labels = "exact"
    if method != "flat":
        labels = resolve_label_mode(run.target.task, config["curvature"]["kind"],
                                    config["method"].get("labels", "auto"))
    n = run.facts["n_train"]
    sample = take_rows(run.train, list(range(min(sample_size, n))))
    top_k = config["score"]["top_k"]
    with stage("plan", out.timings):
        result = plan(run.target, sample, method=method, n_train=n_train or n,
                      n_query=n_query or run.facts["n_query"], kfac_labels=labels,
                      k=top_k or None, batch_size=batch_size, memory_budget=memory_budget,
                      max_job_seconds=max_job_seconds, runtime=run.runtime)
    out.add("plan", f"{method}, n_train={n_train or n}, n_query={n_query or run.facts['n_query']}"
                    f": total {result.total_seconds:.1f} s")
    return out, result


def merged_store(store: RunStore) -> ScoreStore:
    """The merged score store of a partitioned run (``STORE/partitions/merged``)."""
    return ScoreStore.load(store.path / PARTITIONS / MERGED, writable=False)


def score_tensors(run: Run, scores: torch.Tensor, config: dict, inverse) -> tuple[dict, dict]:
    """The ``scores/`` tensors and manifest (see ``store.SCORE_TENSORS``)."""
    section = config["score"]
    n_train = scores.shape[1]
    k = section["top_k"] or max(section["keep"], config["report"]["top"])
    k = min(k, n_train)
    helpful = torch.topk(scores, k, dim=1)
    harmful = torch.topk(-scores, k, dim=1)
    counts, edges = _histograms(scores, section["bins"])
    tensors = {"helpful_index": helpful.indices, "helpful_score": helpful.values,
               "harmful_index": harmful.indices, "harmful_score": -harmful.values,
               "histogram_counts": counts, "histogram_edges": edges}
    if section["top_k"] == 0:
        tensors["scores"] = scores
    n = inverse.n_train_ if inverse is not None else float(n_train)
    manifest = {"n_query": scores.shape[0], "n_train": n_train, "n": n,
                "full": section["top_k"] == 0, "k": k,
                "method": config["method"], "measurement": measurement_text(config),
                "meaning": meaning_text(config, n),
                "query_ids": run.query_ids, "train_ids": run.train_ids}
    return tensors, manifest


def wants_token_scores(run: Run, inverse) -> bool:
    """Token heat maps for text data scored through an inverse with per-module blocks
    (KFAC, EKFAC, block_diagonal, ...: the factored path)."""
    return (run.data.display.get("kind") == "text" and inverse is not None
            and inverse.parameter_blocks_() is not None)


def token_score_tensors(run: Run, inverse, score_tensors: dict, top: int) -> tuple[dict, dict]:
    """The ``scores/`` token tensors for the ``top`` most helpful and harmful training
    sequences of each query (docs/store.md): ``token_pairs [P, 2]``, ``train_token_scores
    [P, T]`` (the part of s flowing through each training token; NaN past the sequence),
    ``train_token_rest [P]`` (the part tied to no token: layers on a pooled vector, ∇R; a row
    plus its rest is the pair's score) and, when the task splits its measurement over tokens
    (a causal LM), ``query_token_scores [n_query, T_q]``: for each query, the score of its most
    helpful training sequence split over the query's tokens (the loss of predicting each)."""
    top = min(top, score_tensors["helpful_index"].shape[1])
    chosen = torch.cat([score_tensors["helpful_index"][:, :top],
                        score_tensors["harmful_index"][:, :top]], dim=1)
    rows = torch.unique(chosen).tolist()
    column = {m: j for j, m in enumerate(rows)}
    subset = take_rows(run.train, rows)
    scorer = Influence(run.target, inverse)
    per_train = scorer.pairwise_per_train_token(run.query, subset, run.runtime)
    display = run.data.display
    pairs, values, rest = [], [], []
    for q in range(chosen.shape[0]):
        for m in dict.fromkeys(chosen[q].tolist()):
            length = len(display["train_tokens"][m])
            pairs.append((q, m))
            values.append(per_train.tokens[q, column[m], :length].double().cpu())
            rest.append(float(per_train.rest[q, column[m]]))
    tensors = {"token_pairs": torch.tensor(pairs, dtype=torch.long),
               "train_token_scores": _nan_padded(values),
               "train_token_rest": torch.tensor(rest, dtype=torch.float64)}
    manifest = {}
    try:
        per_query = scorer.pairwise_per_query_token(run.query, subset, run.runtime)
    except InfluenceKitError as exc:  # the task does not split its measurement over tokens
        log.info("no per-query-token scores: %s", exc)
        return tensors, manifest
    best = score_tensors["helpful_index"][:, 0].tolist()
    tensors["query_token_scores"] = _nan_padded([
        per_query[q, column[m], :len(display["query_tokens"][p])].double().cpu()
        for q, (m, p) in enumerate(zip(best, run.query_positions, strict=True))])
    manifest["query_token_scores_meaning"] = (
        "the score of the query's most helpful training sequence split over the query's "
        "tokens: token τ's term is the part due to the loss of predicting token τ (s > 0: "
        "that training sequence made token τ more likely)")
    return tensors, manifest


def _nan_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def measurement_text(config: dict) -> str:
    task = config["task"]
    return f"{task['name']} task, measurement f = {task.get('measurement', 'loss')}"


def meaning_text(config: dict, n: float) -> str:
    method = config["method"]["name"]
    if method in ("TracIn", "TRAK"):
        return (f"{method} score: positive = helpful (training on the example lowers the "
                "query's loss / raises its margin), negative = harmful; see ik.scoring."
                f"{method} for its scale.")
    return (f"s = g_qᵀ (C + λI)⁻¹ g_m with C the {config['curvature']['kind']} curvature of the "
            f"mean training loss, λ = damping; no 1/n. s > 0: helpful (upweighting the example "
            f"lowers f); s < 0: harmful. Removing the example changes f by about +s/n "
            f"(n = {n:g}).")


def _histograms(scores: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = scores.detach().to(torch.float64).cpu().numpy()
    counts, edges = zip(*(np.histogram(r, bins=bins) for r in rows), strict=True)
    return torch.as_tensor(np.stack(counts)), torch.as_tensor(np.stack(edges))


def examples_of(run: Run, score_tensors: dict) -> tuple[dict, dict]:
    """The ``examples/`` tensors and manifest: inputs of the queries and of every training
    example in a top-k list, labels and predictions (see ``store.EXAMPLE_TENSORS``)."""
    display = dict(run.data.display)
    kind = display.get("kind", "none")
    rows = torch.unique(torch.cat([score_tensors["helpful_index"].ravel(),
                                   score_tensors["harmful_index"].ravel()]))
    tensors = {"query_positions": torch.as_tensor(run.query_positions),
               "train_rows": rows}
    if kind in ("image", "vector"):
        tensors["query_x"] = inputs_of(run.query)
        tensors["train_x"] = inputs_of(take_rows(run.train, rows.tolist()))
    if run.query_labels is not None:
        tensors["query_labels"] = run.query_labels
        tensors["query_predictions"] = run.query_predictions
        tensors["train_labels"] = run.train_labels
    if kind == "text":
        display["query_tokens"] = [display["query_tokens"][p] for p in run.query_positions]
        display["train_tokens"] = {str(r): display["train_tokens"][r] for r in rows.tolist()}
    manifest = {"display": display, "classes": run.data.classes, "query_ids": run.query_ids,
                "train_ids": run.train_ids, "facts": run.facts}
    return tensors, manifest


def inputs_of(data) -> torch.Tensor:
    """The first field (inputs) of every example, stacked ``[n, ...]``."""
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        return data[0]
    return torch.stack([torch.as_tensor(data[i][0]) for i in range(len(data))])


# -- eval -----------------------------------------------------------------------------------------
def evaluate_run(config: dict, store: RunStore, progress: bool | None = None,
                 run: Run | None = None, inverse=None, scores=None,
                 overwrite: bool = False) -> Outcome:
    """Ground truth for the config's ``[eval]`` keys, written to ``evaluation/`` (and
    ``trust.json``): leave-one-out, LDS, removal curves, the response curve, the trust report."""
    from ..diagnostics import check
    from ..evaluation import lds, loo_correlation, removal_curve, sample_subsets
    from ..response import leave_one_out, response_curve, subset_retraining

    out = Outcome("eval", store)
    store.prepare(config, fit_part, overwrite)
    section = config["eval"]
    with stage("build", out.timings):
        out.run = run = run or build_run(config, progress)
    out.add("build", _describe_run(run))
    if run.is_inverse and inverse is None:
        inverse = fitted_inverse(config, store, run, out)
    out.inverse = inverse
    if scores is None:
        scores = _stored_full_scores(store, config)
    if scores is None:
        with stage("score", out.timings):
            scores = compute_scores(run, inverse)
        out.add("score", f"{tuple(scores.shape)} (recomputed: the store holds no full score "
                         "matrix for this config)")
    out.scores = scores
    n_eval = section["queries"] or scores.shape[0]
    query = take_rows(run.query, list(range(min(n_eval, scores.shape[0]))))
    s = scores[:n_eval].to(torch.float64)
    n = float(inverse.n_train_) if inverse is not None else float(scores.shape[1])
    tensors, metrics = {}, {}
    if section["loo"] > 0:
        with stage("leave-one-out", out.timings):
            index = torch.topk(s.abs().amax(dim=0), min(section["loo"], s.shape[1])).indices
            real = leave_one_out(run.target, run.train, index.tolist(), query,
                                 runtime=run.runtime, warm_start=section["loo_warm_start"])
        predicted = conventions.removal_effect(s[:, index], n)
        found = loo_correlation(predicted.numpy(), real.numpy())
        tensors.update(loo_indices=index, loo_predicted=predicted, loo_real=real)
        metrics["loo"] = {"pearson": found["pearson"], "spearman": found["spearman"],
                          "k": len(index)}
        out.add("leave-one-out", f"{len(index)} examples: Pearson {found['pearson']:.3f}, "
                                 f"Spearman {found['spearman']:.3f}")
    retrainer = _retrainer(section)
    if section["lds_subsets"] > 0:
        with stage("LDS", out.timings):
            masks = sample_subsets(s.shape[1], section["lds_alpha"], section["lds_subsets"],
                                   seed=section["seed"])
            real = subset_retraining(run.target, run.train, masks, query, retrainer,
                                     seeds=(section["seed"],), runtime=run.runtime,
                                     store=store.path / "lds_retraining")
            result = lds(s.numpy(), masks, real)
        tensors.update(lds_subsets=torch.as_tensor(masks.astype(np.uint8)),
                       lds_real=torch.as_tensor(real),
                       lds_predicted=-(torch.as_tensor(masks, dtype=torch.float64) @ s.T),
                       lds_per_query=torch.as_tensor(result.per_query))
        metrics["lds"] = {"mean": result.mean, "stderr": result.stderr,
                          "subsets": section["lds_subsets"], "alpha": section["lds_alpha"]}
        out.add("LDS", f"{section['lds_subsets']} subsets: LDS {result.mean:.3f} "
                       f"± {result.stderr:.3f}")
    if section["removal"]:
        with stage("removal curves", out.timings):
            curves = [removal_curve(run.target, run.train, query, q, s[q].numpy(),
                                    section["removal"], retrainer, seed=section["seed"],
                                    runtime=run.runtime)
                      for q in range(min(section["removal_queries"], s.shape[0]))]
        tensors.update(removal_k=torch.as_tensor(section["removal"]),
                       removal_top=torch.tensor([c["top"] for c in curves]),
                       removal_random=torch.tensor([c["random"] for c in curves]))
        metrics["removal"] = {"queries": len(curves)}
        out.add("removal curves", f"{len(curves)} of the queries, k = {section['removal']}")
    if section["response_curve"]:
        _response(run, inverse, s, section, tensors, metrics, out, response_curve)
    if section["trust"]:
        if inverse is None:
            out.rows.append(("trust", 0.0, f"skipped: {config['method']['name']} has no "
                                           "inverse to diagnose"))
        else:
            with stage("trust", out.timings):
                report = check(run.target, inverse, run.train, query, run.runtime,
                               include=tuple(section["trust_include"]))
            store.write_trust(report)
            out.add("trust", f"overall {report.verdict.upper()} -> {store.path / 'trust.json'}")
            metrics["trust"] = report.verdict
    if tensors:
        store.write(EVALUATION, tensors, {"metrics": metrics, "n": n,
                                          "query_ids": run.query_ids[:n_eval],
                                          "train_ids_of_loo": [run.train_ids[i] for i in
                                                               tensors.get("loo_indices", [])]})
    if not tensors and not section["trust"]:
        out.rows.append(("eval", 0.0, "nothing asked: set eval.loo, eval.lds_subsets, "
                                      "eval.removal, eval.response_curve or eval.trust"))
    out.facts["evaluation"] = metrics
    return out.finish()


def _response(run, inverse, s, section, tensors, metrics, out, response_curve):
    if inverse is None:
        out.rows.append(("response curve", 0.0, "skipped: needs an inverse (∂θ/∂w)"))
        return
    m = int(torch.argmax(s[0]))
    with stage("response curve", out.timings):
        curve = response_curve(run.target, run.train, m, section["epsilons"],
                               take_rows(run.query, [0]), inverse=inverse,
                               runtime=run.runtime)
    real = (curve.measurement - curve.measurement_hat)[:, 0]
    tangent = (curve.predicted_measurement - curve.measurement_hat)[:, 0]
    tensors.update(response_epsilons=curve.epsilons, response_real=real,
                   response_tangent=tangent)
    metrics["response"] = {"query": run.query_ids[0], "train": run.train_ids[m],
                           "train_position": m}
    out.add("response curve", f"{run.train_ids[m]} on {run.query_ids[0]}, "
                              f"{len(section['epsilons'])} weights")


def _retrainer(section: dict):
    from ..response import LBFGSRetrainer, SGDRetrainer

    args = dict(section["retrainer_args"])
    if section["retrainer"] == "lbfgs":
        return LBFGSRetrainer(**args)
    if "dtype" in args:
        args["dtype"] = getattr(torch, args["dtype"])
    return SGDRetrainer(**args)


def _stored_full_scores(store: RunStore, config: dict):
    if not store.has(SCORES):  # RunStore.prepare checked the store belongs to this config
        return None
    tensors, _ = store.read(SCORES)
    return tensors.get("scores")


# -- replay ---------------------------------------------------------------------------------------
def replay_run(store: RunStore, progress: bool | None = None, rtol: float = 0.0,
               atol: float = 0.0) -> Outcome:
    """Rebuild from the store's config, refit, rescore, and compare with the stored scores."""
    config = store.config()
    stored, manifest = store.read(SCORES)
    out = Outcome("replay", store)
    with stage("build", out.timings):
        out.run = run = build_run(config, progress)
    out.add("build", _describe_run(run))
    if run.is_inverse:
        with stage("fit", out.timings):
            out.inverse = fit_inverse(run)
        out.add("fit", repr(out.inverse))
        fitted = store.read(INVERSE)[1]["fit_info"]["fingerprint"] if store.has(INVERSE) else None
        if fitted is not None and fitted != run.target.fingerprint():
            out.ok = False
            out.message = ("the model factory built a model with other parameter values than "
                           "the stored one (fingerprint mismatch): training is not "
                           "deterministic, or the factory or its data changed")
    with stage("score", out.timings):
        out.scores = compute_scores(run, out.inverse)
    differences = compare_scores(stored, manifest, out.scores, rtol, atol)
    if differences:
        out.ok = False
        out.message = "; ".join(filter(None, [out.message, differences]))
    verdict = "identical" if out.ok and rtol == atol == 0 else ("same" if out.ok else "DIFFER")
    out.add("score", f"{tuple(out.scores.shape)}: {verdict}")
    out.facts["replay_ok"] = out.ok
    return out.finish()


def compare_scores(stored: dict, manifest: dict, scores: torch.Tensor, rtol: float,
                   atol: float) -> str:
    """Empty when ``scores`` matches the store within (rtol, atol), else where they differ."""
    if "scores" in stored:
        old, new = stored["scores"], scores
        if old.shape != new.shape:
            return f"scores have shape {tuple(new.shape)}, the store has {tuple(old.shape)}"
        close = _close(old, new, rtol, atol)
        if bool(close.all()):
            return ""
        q, m = (~close).nonzero()[0].tolist()
        return (f"{int((~close).sum())} of {close.numel()} scores differ (max |Δ| = "
                f"{float((new - old.to(new.dtype)).abs().max()):.3g}); first at query "
                f"'{manifest['query_ids'][q]}', train '{manifest['train_ids'][m]}': stored "
                f"{float(old[q, m]):.10g}, replayed {float(new[q, m]):.10g}")
    k = stored["helpful_index"].shape[1]
    for name, sign in (("helpful", 1.0), ("harmful", -1.0)):
        top = torch.topk(sign * scores, k, dim=1)
        same_index = torch.equal(top.indices, stored[f"{name}_index"])
        close = _close(stored[f"{name}_score"], sign * top.values, rtol, atol)
        if not same_index or not bool(close.all()):
            q = int((~close.all(dim=1) | (top.indices != stored[f"{name}_index"]).any(dim=1))
                    .nonzero()[0])
            return (f"the top-{k} {name} lists differ, first for query "
                    f"'{manifest['query_ids'][q]}': stored "
                    f"{stored[f'{name}_index'][q].tolist()}, replayed {top.indices[q].tolist()}")
    return ""


def _close(old, new, rtol, atol):
    old = old.to(new.dtype)
    if rtol == 0 and atol == 0:
        return old == new
    return (new - old).abs() <= atol + rtol * old.abs()


# -- helpers --------------------------------------------------------------------------------------
def _describe_run(run: Run) -> str:
    facts = run.facts
    text = (f"p = {facts['num_params']:,}, {facts['n_train']} train, {facts['n_query']} "
            f"queries")
    if "query_accuracy" in facts:
        text += (f" (train accuracy {facts['train_accuracy']:.3f}, query accuracy "
                 f"{facts['query_accuracy']:.3f})")
    return text


def _sha(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def check_store_for_report(store: RunStore) -> None:
    if not store.has(SCORES):
        raise StoreError(f"{store.path} has no scores/: run `influencekit score --store "
                         f"{store.path}` first.")
