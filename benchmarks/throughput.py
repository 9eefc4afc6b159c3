"""Throughput of large runs; every figure is a ratio against a baseline measured in the same run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/throughput.py [--quick]
        [--sections scoring processes sweep gradients]

1. Scoring vs a plain GEMM of the same shape ``[n_query, p] @ [p, n_train]`` (float32, bfloat16):
   blocked GEMMs, blocked GEMMs into a running top-k, blocked GEMMs into a score store
   (goal: >= 75% of the GEMM's rate). Precomputed gradients; one thread.
2. 2 processes x 1 thread (torchrun, gloo) vs 1 process x 2 threads: ``stream_scores`` with a
   top-k on a 64-256-256-10 MLP (goal: no slower).
3. Top-k scoring (``stream_scores``, k=10) time and peak memory as n_train grows 1k -> 100k and
   n_query 10 -> 10k; each point in a fresh process, peak = growth of the resident set after
   the data are built (goal: memory flat in n_train, time linear).
4. Per-example gradients (``ik.grads.iter_gradients``, each ``Runtime(engine=...)``) vs a plain
   batched forward+backward of the summed loss over the same loader (goal: within 1.5x), on a
   64-256-256-10 MLP, a small CNN and the tiny BERT of tests/transformer_models.py (all its
   parameters, and without its position embeddings); float32, one thread, best of 3; the
   baseline and the pass are benchmarks/hook_gradients.py's. Each model in a fresh process,
   once with glibc's defaults and once with ``MALLOC_MMAP_MAX_=0`` (large blocks reused from
   the heap instead of fresh ``mmap`` pages, which are zero-filled on first touch).

Workers (``--parallel-worker``, ``--sweep-worker``, ``--gradient-worker``) are this file run in
subprocesses.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import influencekit as ik
from influencekit.scoring import RunningTopK, score_block
from influencekit.storage import ScoreStore

HERE = Path(__file__).resolve()


def best_of(fn, repeats=3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def load() -> str:
    return open("/proc/loadavg").read().split(" ")[0] if os.path.exists("/proc/loadavg") else "?"


# -- 1. scoring vs GEMM -------------------------------------------------------------------------
def scoring_vs_gemm(n_query: int, p: int, n_train: int, block: int, dtype: torch.dtype):
    torch.manual_seed(0)
    pre = torch.randn(n_query, p).to(dtype)
    grads = torch.randn(n_train, p).to(dtype)
    blocks = [(s, grads[s:s + block]) for s in range(0, n_train, block)]

    def gemm():
        return pre @ grads.T

    def blocked():
        for _, g in blocks:
            score_block(pre, g, dtype)

    def top_k():
        top = RunningTopK(n_query, 10)
        for s, g in blocks:
            top.update(score_block(pre, g, dtype), s)

    folder = Path(tempfile.mkdtemp())

    def stored():
        name = "bfloat16" if dtype == torch.bfloat16 else "float32"
        store = ScoreStore.open(folder / f"s{time.perf_counter_ns()}", n_query=n_query,
                                n_train=n_train, block_shape=(n_query, block), dtype=name)
        for i, (_, g) in enumerate(blocks):
            store.write_block(0, i, score_block(pre, g, dtype))
        store.commit()

    base = best_of(gemm)
    rows = []
    for name, fn in (("blocked GEMMs", blocked), ("blocked + top-10", top_k),
                     ("blocked + score store", stored)):
        t = best_of(fn)
        rows.append((name, t, base / t))
    flops = 2 * n_query * p * n_train / base
    return base, flops, rows


# -- 2. processes vs threads --------------------------------------------------------------------
def mlp_problem(widths, n_train, n_query, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(n_train + n_query, widths[0])
    y = torch.randint(0, widths[-1], (n_train + n_query,))
    target = ik.Target(model, ik.ClassificationTask())
    return target, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def parallel_worker(n_train: int, n_query: int) -> None:
    """Time ``stream_scores`` (top-10) in this process / under torchrun; rank 0 prints JSON."""
    from influencekit.distributed import DistContext

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    with DistContext.from_env() as ctx:
        target, train, query = mlp_problem((64, 256, 256, 10), n_train, n_query)
        runtime = ik.Runtime(batch_size=256, progress=False)
        inverse = ik.KFAC(damping=1e-3).fit(ik.Curvature(target, (train[0][:512],
                                                                  train[1][:512])), runtime)
        influence = ik.Influence(target, inverse)
        influence.precondition(query, runtime)  # warm-up (first vmap call)
        ctx.barrier()
        start = time.perf_counter()
        ik.stream_scores(influence, query, train, k=10, block_size=256, runtime=runtime,
                         context=ctx)
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        slowest = float(ctx.all_gather_rows(seconds).max())
        if ctx.is_main:
            print(json.dumps({"seconds": slowest, "world_size": ctx.world_size,
                              "threads": threads}))


def processes_vs_threads(n_train: int, n_query: int):
    src = str(HERE.parent.parent / "src")
    args = [str(HERE), "--parallel-worker", str(n_train), str(n_query)]
    one = _run_json([sys.executable, *args], {"OMP_NUM_THREADS": "2", "PYTHONPATH": src})
    two = _run_json([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", *args], {"OMP_NUM_THREADS": "1", "PYTHONPATH": src})
    return one["seconds"], two["seconds"]


# -- 3. time and memory as the sizes grow -------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def sweep_worker(n_train: int, n_query: int) -> None:
    torch.set_num_threads(1)
    target, train, query = mlp_problem((32, 32, 10), n_train, n_query)
    runtime = ik.Runtime(batch_size=1024, progress=False)
    fit_on = (train[0][:1000], train[1][:1000])
    influence = ik.Influence(target, ik.KFAC(damping=1e-3).fit(ik.Curvature(target, fit_on),
                                                                runtime))
    influence.precondition((query[0][:8], query[1][:8]), runtime)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    result = ik.stream_scores(influence, query, train, k=10, block_size=1024, runtime=runtime)
    seconds = time.perf_counter() - start
    assert result.n_train_scored == n_train
    print(json.dumps({"seconds": seconds, "peak_bytes": _status("VmHWM") - base,
                      "p": target.num_params}))


def sweep(points):
    src = str(HERE.parent.parent / "src")
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": src, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = []
    for n_query, n_train in points:
        r = _run_json([sys.executable, str(HERE), "--sweep-worker", str(n_train), str(n_query)],
                      env)
        out.append((n_query, n_train, r["seconds"], r["peak_bytes"], r["p"]))
    return out


def _run_json(cmd, env) -> dict:
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- 4. per-example gradients vs a plain batched forward+backward -----------------------------
def gradient_cases(quick: bool) -> dict:
    """``{name: (target, data, batch size)}``, float32."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                        nn.Linear(256, 10))
    n = 1024 if quick else 4096
    cases = {"MLP 64-256-256-10": (ik.Target(mlp, ik.ClassificationTask()),
                                   (torch.randn(n, 64), torch.randint(0, 10, (n,))), 256)}
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    n = 256 if quick else 1024
    cases["CNN 2 conv + linear, 28x28"] = (ik.Target(cnn, ik.ClassificationTask()),
                                           (torch.randn(n, 1, 28, 28),
                                            torch.randint(0, 10, (n,))), 128)
    bert = tiny_bert()
    if bert is not None:
        n = 256 if quick else 1024
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(4, 17, (n,), generator=gen)
        ids = torch.randint(1, 11, (n, 16), generator=gen)
        mask = (torch.arange(16)[None] < lengths[:, None]).long()
        data = {"input_ids": ids * mask, "attention_mask": mask,
                "labels": torch.randint(0, 3, (n,), generator=gen)}
        cases["tiny BERT (tests/transformer_models.py), T=16"] = (
            ik.Target(bert, ik.SequenceClassificationTask()), data, 64)
        # position ids [1, T] are shared by the batch: the engine expands that embedding's
        # output per example (it stays on hooks); the row without it shows what that costs
        hookable = [n for n, _ in bert.named_parameters() if "position_embeddings" not in n]
        cases["tiny BERT without position embeddings"] = (
            ik.Target(bert, ik.SequenceClassificationTask(), params=hookable), data, 64)
    return cases


def tiny_bert():
    """The tiny BERT of tests/transformer_models.py (2 layers, hidden 8), float32; None
    without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=3, pad_token_id=0,
        attn_implementation="sdpa")
    return transformers.BertForSequenceClassification(config).eval()


def per_example_vs_batched(target, data, batch_size: int) -> tuple[float, dict]:
    """(seconds of forward+backward of the summed loss over every batch, {engine: seconds of
    a pass of per-example gradients ``[B, p]``, or the error}); the baseline and the pass are
    those of benchmarks/hook_gradients.py, each the best of 3."""
    import hook_gradients

    base = hook_gradients.best_time(
        lambda: hook_gradients.plain_backward(target, data, batch_size), 3)
    engines = {}
    for engine in ("auto", "hooks", "vmap", "loop"):
        try:
            engines[engine] = hook_gradients.best_time(
                lambda e=engine: hook_gradients.engine_pass(target, data, e, batch_size), 3)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            engines[engine] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    return base, engines


def gradient_worker(index: int, quick: bool) -> None:
    """Time case ``index`` of :func:`gradient_cases` in this process; print JSON."""
    torch.set_num_threads(1)
    name, (target, data, batch) = list(gradient_cases(quick).items())[index]
    n = len(next(iter(data.values())) if isinstance(data, dict) else data[0])
    base, engines = per_example_vs_batched(target, data, batch)
    print(json.dumps({"name": name, "p": target.num_params, "n": n, "batch": batch,
                      "base": base, "engines": engines}))


MALLOC_REUSE = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def gradient_rows(quick: bool) -> list[tuple[str, dict]]:
    src = str(HERE.parent.parent / "src")
    rows = []
    for index in range(len(gradient_cases(quick))):
        for label, extra in (("default", {}), ("heap reuse", MALLOC_REUSE)):
            args = [sys.executable, str(HERE), "--gradient-worker", str(index)]
            env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": src, **extra}
            rows.append((label, _run_json(args + (["--quick"] if quick else []), env)))
    return rows


# -- report -------------------------------------------------------------------------------------
SECTIONS = ("scoring", "processes", "sweep", "gradients")


def main(quick: bool, sections=SECTIONS) -> None:
    torch.set_num_threads(1)
    print(f"load at start: {load()}, torch {torch.__version__}, threads 1 unless stated\n")
    if "scoring" in sections:
        scoring_section(quick)
    if "processes" in sections:
        processes_section(quick)
    if "sweep" in sections:
        sweep_section(quick)
    gradient_section(quick, sections)
    print(f"\nload at end: {load()}")


def scoring_section(quick: bool) -> None:
    n_query, p, n_train = (50, 1024, 8192) if quick else (100, 2048, 20480)
    print(f"### Scoring vs a plain GEMM [{n_query}, {p}] @ [{p}, {n_train}], blocks of 1024\n")
    print("| dtype | GEMM s | GEMM GFLOP/s | variant | s | share of GEMM rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        base, flops, rows = scoring_vs_gemm(n_query, p, n_train, 1024, dtype)
        for name, t, ratio in rows:
            print(f"| {str(dtype)[6:]} | {base:.3f} | {flops / 1e9:.1f} | {name} | {t:.3f} | "
                  f"{ratio:.0%} |")


def processes_section(quick: bool) -> None:
    n_train_pt, n_query_pt = (1024, 10) if quick else (4096, 20)
    one, two = processes_vs_threads(n_train_pt, n_query_pt)
    print(f"\n### 2 processes x 1 thread vs 1 process x 2 threads (stream_scores, top-10, "
          f"MLP 64-256-256-10, n_train={n_train_pt}, n_query={n_query_pt})\n")
    print("| 1 process x 2 threads s | 2 processes x 1 thread s | threads / processes |")
    print("| --- | --- | --- |")
    print(f"| {one:.2f} | {two:.2f} | {one / two:.2f} |")


def sweep_section(quick: bool) -> None:
    if quick:
        train_points = [(100, 1000), (100, 10000)]
        query_points = [(10, 10000), (1000, 10000)]
    else:
        train_points = [(100, 1000), (100, 10000), (100, 100000)]
        query_points = [(10, 10000), (100, 10000), (1000, 10000), (10000, 10000)]
    rows = sweep(train_points + [q for q in query_points if q not in train_points])
    p_small = rows[0][4]
    print(f"\n### Top-10 scoring as the sizes grow (stream_scores, MLP 32-32-10, p={p_small}, "
          "float32, blocks of 1024, KFAC inverse)\n")
    print("| n_query | n_train | s | µs per training example | peak memory MiB |")
    print("| --- | --- | --- | --- | --- |")
    for nq, nt, s, peak, _ in rows:
        print(f"| {nq} | {nt} | {s:.2f} | {s / nt * 1e6:.0f} | {peak / 2**20:.1f} |")


def gradient_section(quick: bool, sections) -> None:
    if "gradients" in sections:
        print("\n### Per-example gradients vs a plain batched forward+backward (float32, one "
              "thread, ratio = per-example / forward+backward)\n")
        print("| model | p | n | batch | malloc | forward+backward s | engine | per-example s | "
              "ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, r in gradient_rows(quick):
            for engine, t in r["engines"].items():
                cells = (f"{t:.3f} | {t / r['base']:.2f}" if isinstance(t, float) else f"{t} | -")
                print(f"| {r['name']} | {r['p']:,} | {r['n']} | {r['batch']} | {label} | "
                      f"{r['base']:.3f} | {engine} | {cells} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parallel-worker", nargs=2, type=int)
    parser.add_argument("--sweep-worker", nargs=2, type=int)
    parser.add_argument("--gradient-worker", type=int)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    args = parser.parse_args()
    if args.parallel_worker:
        parallel_worker(*args.parallel_worker)
    elif args.sweep_worker:
        sweep_worker(*args.sweep_worker)
    elif args.gradient_worker is not None:
        gradient_worker(args.gradient_worker, args.quick)
    else:
        main(args.quick, args.sections)
