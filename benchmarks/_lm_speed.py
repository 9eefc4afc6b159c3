"""Speed of factored scoring against a plain batched forward+backward of the same model.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/_lm_speed.py [--json] [--repeats 3]

``measure_factored_speed`` is the helper other benchmarks call (benchmarks/language_models.py):
given a Target, training data, queries and a fitted block-diagonal inverse, it times

- the baseline: one forward and one backward of the summed training loss per batch, gradients
  w.r.t. the Target's parameters (what training costs; as in benchmarks/hook_gradients.py);
- factored scoring: ``Influence.pairwise_prepared`` of queries prepared beforehand (the
  training pass only: one hooked forward and backward per batch, per-layer products with the
  preconditioned queries; no ``[B, p]`` block);

and reports examples/s of both and their ratio (best of ``repeats`` passes, same process, same
data, same batch size). Run as a script it measures a tiny GPT (GPT-2 config: 4 layers, width
128, vocabulary 512, 64 tokens) and a 784-1024-1024-10 MLP (1.86M parameters), float32, with
EK-FAC, at full rank and with query batching (rank 1 and 8).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

import influencekit as ik


def best_time(fn, repeats: int) -> float:
    """The shortest of ``repeats`` runs of ``fn()`` in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plain_forward_backward(target: ik.Target, data, batch_size: int) -> None:
    """One forward and one backward of the summed loss per batch (the baseline)."""
    loader = ik.grads.as_loader(data, ik.Runtime(batch_size=batch_size, progress=False))
    live = {n: p.requires_grad_(True) for n, p in target.params().items()}
    for batch in loader:
        target.losses(live, batch).sum().backward()


def measure_factored_speed(target: ik.Target, train, query, inverse, *,
                           query_rank: int | None = None, batch_size: int = 32,
                           repeats: int = 3) -> dict:
    """Examples/s of factored scoring vs a plain batched forward+backward (module docstring).

    Returns ``{"n_train", "n_query", "query_rank", "batch_size", "plain_s", "factored_s",
    "prepare_s", "plain_examples_per_s", "factored_examples_per_s", "ratio"}`` where ``ratio`` =
    factored time / plain time (1 = as fast as training; the goal is within 3) and
    ``prepare_s`` the one-off cost of the queries (gradients, solve, SVD).
    """
    runtime = ik.Runtime(batch_size=batch_size, progress=False)
    scorer = ik.Influence(target, inverse, query_rank=query_rank, path="factored")
    start = time.perf_counter()
    prepared = scorer.prepare_queries(query, runtime)
    prepare_s = time.perf_counter() - start
    n_train = ik.grads.num_examples(train)
    plain_forward_backward(target, ik.grads.take(train, range(min(batch_size, n_train))),
                           batch_size)                                       # warm-up
    plain = best_time(lambda: plain_forward_backward(target, train, batch_size), repeats)
    factored = best_time(lambda: scorer.pairwise_prepared(prepared, train, runtime), repeats)
    return {"n_train": n_train, "n_query": prepared.n_query, "query_rank": query_rank,
            "batch_size": batch_size, "plain_s": plain, "factored_s": factored,
            "prepare_s": prepare_s, "plain_examples_per_s": n_train / plain,
            "factored_examples_per_s": n_train / factored, "ratio": factored / plain}


# -- the script's two models --------------------------------------------------------------------
def tiny_gpt(seed: int = 0, n_train: int = 256, n_query: int = 10, length: int = 64):
    """(target, train, query): GPT-2 config (4 layers, width 128, 4 heads, vocabulary 512),
    float32, random token sequences; the Target is every attention and MLP layer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=512, n_embd=128, n_layer=4, n_head=4,
                                     n_positions=length, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (n_train + n_query, length), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = ik.Target(model, ik.CausalLMTask(),
                       params=lambda n, p: ".attn." in n or ".mlp." in n)
    train = {k: v[:n_train] for k, v in data.items()}
    query = {k: v[n_train:] for k, v in data.items()}
    return target, train, query


def mlp(seed: int = 0, n_train: int = 2048, n_query: int = 10):
    """(target, train, query): a 784-1024-1024-10 ReLU MLP (1.86M parameters), float32."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_query, 784, generator=gen)
    y = torch.randint(0, 10, (n_train + n_query,), generator=gen)
    target = ik.Target(model, ik.ClassificationTask())
    return target, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def run(repeats: int) -> list[dict]:
    rows = []
    for name, build, batch_size in (("tiny_gpt", tiny_gpt, 32), ("mlp", mlp, 256)):
        target, train, query = build()
        fit_data = ik.grads.take(train, range(min(256, ik.grads.num_examples(train))))
        inverse = ik.EKFAC(damping="auto").fit(ik.Curvature(target, fit_data),
                                              ik.Runtime(batch_size=batch_size, progress=False))
        for rank in (None, 8, 1):
            row = measure_factored_speed(target, train, query, inverse, query_rank=rank,
                                         batch_size=batch_size, repeats=repeats)
            rows.append({"model": name, "params": target.num_params, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = run(args.repeats)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps([{**r, "load": load} for r in rows]))
        return
    print(f"load average (1 min) at the end: {load:.2f}; threads: {torch.get_num_threads()}")
    print(f"{'model':9} {'params':>9} {'n_query':>7} {'rank':>5} {'plain ex/s':>11} "
          f"{'factored ex/s':>14} {'ratio':>6} {'prepare s':>9}")
    for r in rows:
        print(f"{r['model']:9} {r['params']:9d} {r['n_query']:7d} {str(r['query_rank']):>5} "
              f"{r['plain_examples_per_s']:11.1f} {r['factored_examples_per_s']:14.1f} "
              f"{r['ratio']:6.2f} {r['prepare_s']:9.2f}")


if __name__ == "__main__":
    main()
