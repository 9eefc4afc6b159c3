"""Plan small runs, then run their stages and measure them; prints one JSON object.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python tests/scale_plan_measure.py [CASE ...]

Launched by tests/test_planner.py (and usable by hand). Memory is the growth of the peak
resident set (Linux VmHWM, reset through /proc/self/clear_refs before each stage; the fixed mmap
threshold makes freed blocks go back to the system, so one stage does not hide in another's
freed memory); time is the best of three runs.
"""

import json
import sys
import time

import torch
from torch import nn

import influencekit as ik
from influencekit.scoring import RunningTopK, score_block

CASES = {
    # name: (layer widths, n_train, n_query, method, batch size)
    "flat": ((16, 24, 10), 400, 20, "flat", 128),
    "kfac": ((64, 256, 256, 10), 1500, 20, "kfac", 256),
    "ekfac": ((32, 128, 128, 10), 300, 20, "ekfac", 128),
    "scoring": ((64, 256, 256, 10), 1200, 60, "kfac", 256),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(fn, repeats=2):
    """(best seconds, peak memory growth in bytes of the first run)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    peak = _status("VmHWM") - base
    for _ in range(repeats - 1):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, peak


def build(widths, n_train, n_query):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    x = torch.randn(n_train + n_query, widths[0])
    y = torch.randint(0, widths[-1], (n_train + n_query,))
    target = ik.Target(model, ik.ClassificationTask())
    return target, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def run_case(case: str) -> dict:
    widths, n_train, n_query, method, batch = CASES[case]
    target, train, query = build(widths, n_train, n_query)
    sample = (train[0][:64], train[1][:64])
    runtime = ik.Runtime(batch_size=batch, progress=False)
    plan = ik.plan(target, sample, method=method, n_train=n_train, n_query=n_query, k=10,
                   batch_size=batch, runtime=runtime)
    est = {s.name: [s.seconds, s.memory_bytes] for s in plan.stages}
    got = {}
    curvature = ik.Curvature(target, train, kind="ggn")
    inverse_cls = {"flat": ik.Exact, "kfac": ik.KFAC, "ekfac": ik.EKFAC}[method]
    # a fit on four examples first: torch.func's lazy imports are not the fit's memory
    inverse_cls(damping=1e-3).fit(ik.Curvature(target, tuple(t[:4] for t in train)), runtime)
    if case != "scoring":
        got["fit+eigendecomposition"] = measure(
            lambda: inverse_cls(damping=1e-3).fit(curvature, runtime))
    else:
        inverse = ik.KFAC(damping=1e-3).fit(curvature, runtime)
        influence = ik.Influence(target, inverse)
        got["query_gradients"] = measure(lambda: influence.precondition(query, runtime))
        got["train_gradients"] = measure(
            lambda: [None for _ in ik.grads.iter_gradients(target, train, runtime)])
        pre = influence.precondition(query, runtime)
        blocks = [g for _, g in ik.grads.iter_gradients(target, train, runtime)]

        def scoring():
            top = RunningTopK(n_query, 10)
            for i, g in enumerate(blocks):
                top.update(score_block(pre, g, pre.dtype), i * batch)

        got["scoring"] = measure(scoring)
        del blocks
        got["stream_scores"] = measure(lambda: ik.stream_scores(
            influence, query, train, k=10, block_size=batch, runtime=runtime), repeats=1)
    return {"estimate": est, "measured": got}


def main(cases) -> None:
    torch.set_num_threads(1)
    print(json.dumps({case: run_case(case) for case in cases}))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
