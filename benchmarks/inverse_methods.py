"""Every inverse-curvature method against Exact (and kronfluence), on real trained models.

Tasks:
- ``digits``: MLP 64-H-10 (tanh) on scikit-learn digits (standardised pixels), full-batch L-BFGS
  with L2 to convergence (float64), then cast to float32; queries = the first test points.
- ``fashion``: a small ResNet with batch norm on a Fashion-MNIST subset (skipped with a message
  when ``dataset-fashion-mnist`` is not installed); trained with Adam in train mode, then the
  eval-mode function (running BN statistics) is re-optimised with full-batch L-BFGS so that the
  point where influence is taken is a real optimum. Influence is taken w.r.t. the conv / linear
  parameters (the ones K-FAC and kronfluence support); BN affine parameters are held fixed.

Reference: ``Exact(damping)`` of the damped GGN of the mean training loss plus ∇²R in float64.
Each method runs in its own fresh subprocess (so peak memory is that method's alone):

- ``fit_s``: wall time of ``inverse.fit(Curvature(...))`` (kronfluence: ``fit_all_factors``);
- ``query_s``: wall time of ``Influence.pairwise(query, train)`` divided by the number of queries
  (it includes the training gradients; kronfluence: ``compute_pairwise_scores``);
- ``peak_mb``: peak resident memory (VmHWM, reset just before fit) minus resident memory at that
  moment, on CPU; ``torch.cuda.max_memory_allocated`` growth on GPU;
- ``pearson_vs_exact``: Pearson over all query x train scores; ``spearman_vs_exact``: mean over
  queries of the Spearman correlation across training examples.

Damping mapping for kronfluence: its factors are of per-example losses averaged over examples (the
curvature of the MEAN loss, like ours, when ``compute_train_loss`` returns the SUM over the batch)
and ``damping_factor`` is added to every eigenvalue, but it knows nothing of the L2 regulariser.
So kronfluence gets ``damping_factor = λ + l2`` (∇²R = l2·I). Its training gradients are ∇ℓ only,
ours are ∇ℓ + ∇R (conventions table); the difference adds a per-query constant to every score, so
per-query Spearman is unaffected, and Pearson is also reported with loss-only gradients on both
sides (``pearson_vs_exact_lossgrad``).

Run:  PYTHONPATH=src python benchmarks/inverse_methods.py [--json] [--task digits|fashion|all]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import influencekit as ik
from influencekit.data import digits, fashion_mnist, fashion_mnist_available

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------
# models and training
# ---------------------------------------------------------------------------------------------
def mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """conv(1→c, stride 2) BN ReLU, residual blocks c→c and c→2c (stride 2), pool, linear."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = Block(width, width, 1)
        self.block2 = Block(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.head(x.mean(dim=(2, 3)))


def build_model(name: str, kwargs: dict) -> nn.Module:
    return {"mlp": mlp, "resnet": SmallResNet}[name](**kwargs)


def conv_linear_params(model: nn.Module) -> list[str]:
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names += [f"{mod_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
    return names


def make_target(spec: dict, model: nn.Module) -> ik.Target:
    params = spec.get("params")
    return ik.Target(model, ik.ClassificationTask(), params=params,
                     regularizer=ik.L2Regularizer(spec["l2"]))


def prepare_digits(args, folder: Path) -> dict:
    split = digits(seed=0)
    torch.manual_seed(0)
    model = mlp(args.hidden).double()
    spec = {"task": "digits", "model": "mlp", "model_kwargs": {"hidden": args.hidden},
            "l2": args.l2, "params": None}
    target = make_target(spec, model)
    train = (split.train[0].double(), split.train[1])
    warm = ik.response.train(target, train, ik.response.batch_schedule(
        len(train[1]), batch_size=None, steps=2000), optimizer="adam", lr=1e-2)
    result = ik.minimize(target, train, init=warm.params, max_iter=5000, grad_tol=1e-9)
    ik.write_params(target, result.params)
    query = (split.test[0][:args.n_query], split.test[1][:args.n_query])
    accuracy = float((model(split.test[0].double()).argmax(1) == split.test[1]).double().mean())
    note = (f"MLP 64-{args.hidden}-10, {target.num_params} params, L2 {args.l2}, L-BFGS grad "
            f"max-norm {result.grad_norm:.1e}, test accuracy {accuracy:.3f}")
    return _save_task(folder, spec, model.float(), split.train, query, note)


def prepare_fashion(args, folder: Path) -> dict | None:
    if not fashion_mnist_available():
        print("fashion: skipped, Fashion-MNIST is not installed "
              "(apt-get install -y dataset-fashion-mnist)", file=sys.stderr)
        return None
    split = fashion_mnist(n_train=args.fashion_train, n_test=args.n_query, seed=0)
    torch.manual_seed(0)
    model = SmallResNet(args.width)
    x, y = split.train
    # The user's own recipe (batch norm in train mode updating its running statistics) before
    # the model is frozen in eval mode; the library's loop trains a frozen model's parameters.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(args.fashion_epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().double()
    spec = {"task": "fashion", "model": "resnet", "model_kwargs": {"width": args.width},
            "l2": args.l2, "params": conv_linear_params(model)}
    target = make_target(spec, model)
    train = (x.double(), y)
    result = ik.minimize(target, train, max_iter=args.fashion_lbfgs, grad_tol=1e-8)
    ik.write_params(target, result.params)
    accuracy = float((model(split.test[0].double()).argmax(1) == split.test[1]).double().mean())
    note = (f"ResNet (BN, eval mode) width {args.width}, {target.num_params} conv/linear params, "
            f"{len(y)} train, L2 {args.l2}, L-BFGS grad max-norm {result.grad_norm:.1e}, "
            f"query accuracy {accuracy:.3f}")
    return _save_task(folder, spec, model.float(), split.train, split.test, note)


def _save_task(folder, spec, model, train, query, note) -> dict:
    """Model weights and data as a safetensors store (no pickle): ``model.<name>``,
    ``train.<i>``, ``query.<i>``."""
    spec = dict(spec, note=note, path=str(folder / "task"))
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"train.{i}": t for i, t in enumerate(train)})
    tensors.update({f"query.{i}": t for i, t in enumerate(query)})
    ik.storage.save_tensors(spec["path"], tensors, {"kind": "benchmark task"})
    return spec


def load_task(spec: dict):
    tensors, _ = ik.storage.load_tensors(spec["path"])
    model = build_model(spec["model"], spec["model_kwargs"])
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    model.eval()

    def part(prefix):
        count = sum(k.startswith(prefix + ".") for k in tensors)
        return tuple(tensors[f"{prefix}.{i}"] for i in range(count))

    return model, part("train"), part("query")


# ---------------------------------------------------------------------------------------------
# which methods
# ---------------------------------------------------------------------------------------------
def method_specs(args, spec: dict) -> list[dict]:
    """Methods to run: everything in ik.inverse.REGISTRY with settings, plus kronfluence."""
    from influencekit.inverse import REGISTRY
    lam = args.damping
    settings = {
        "CG": [("CG", {"damping": lam, "max_iter": args.cg_iter, "tol": 1e-10,
                       "on_failure": "warn"})],
        "LiSSA": [("LiSSA", {"damping": lam, "scale": args.lissa_scale,
                             "n_iter": args.lissa_depth, "minibatch_size": args.lissa_batch})],
        "Arnoldi": [("Arnoldi", {"damping": lam, "rank": args.rank})],
        "KFAC": [("KFAC", {"damping": lam, "labels": "exact"}),
                 ("KFAC_sampled", {"damping": lam, "labels": "sampled"})],
        "EKFAC": [("EKFAC", {"damping": lam, "labels": "exact"}),
                  ("EKFAC_sampled", {"damping": lam, "labels": "sampled"}),
                  ("EKFAC_empirical", {"damping": lam, "kind": "empirical_fisher"})],
        "Diagonal": [("Diagonal", {"damping": lam})],
        "Identity": [("Identity", {"damping": lam})],
    }
    rows = [{"method": "Exact", "cls": "Exact", "kwargs": {"damping": lam}, "runtime_f64": True}]
    for name, cls in REGISTRY.items():
        if name in ("Exact", "BlockDiagonal") or name.startswith("_") or inspect.isabstract(cls):
            continue
        if name.startswith("Projected"):  # fits a ProjectedCurvature: language_models.py
            continue
        for label, kwargs in settings.get(name, [(name, {"damping": lam})]):
            rows.append({"method": label, "cls": name, "kwargs": kwargs})
    if "BlockDiagonal" in REGISTRY:
        rows.append({"method": "block_diagonal(Exact per layer)", "cls": "BlockDiagonal",
                     "kwargs": {"default": {"cls": "Exact", "kwargs": {"damping": lam}}},
                     "runtime_f64": True})
    if not args.skip_kronfluence:
        for strategy in ("ekfac", "kfac"):
            rows.append({"method": f"kronfluence_{strategy}", "kron": strategy,
                         "empirical": False})
        rows.append({"method": "kronfluence_ekfac_empirical", "kron": "ekfac", "empirical": True})
    if args.methods:
        keep = set(args.methods.split(",")) | {"Exact"}
        rows = [r for r in rows if r["method"] in keep]
    return rows


# ---------------------------------------------------------------------------------------------
# one method in a fresh process
# ---------------------------------------------------------------------------------------------
def _rss_reset() -> int:
    """Reset the peak-RSS mark of this process; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kb("VmRSS") * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class MemoryMeter:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _rss_reset()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.start
        self.peak_mb = max(self.peak, 0) / 2**20


def _build_inverse(cls: str, kwargs: dict):
    from influencekit.inverse import REGISTRY
    kwargs = dict(kwargs)
    kwargs.pop("kind", None)
    if cls == "BlockDiagonal":
        inner = kwargs["default"]
        return REGISTRY["BlockDiagonal"](default=REGISTRY[inner["cls"]](**inner["kwargs"]))
    return REGISTRY[cls](**kwargs)


def run_ours(method: dict, spec: dict, device: str, n_query_warm: int = 2) -> dict:
    model, train, query = load_task(spec)
    model.to(device)
    target = make_target(spec, model)
    dtype = torch.float64 if method.get("runtime_f64") else None
    runtime = ik.Runtime(device=device, dtype=dtype, batch_size=256, progress=False)
    kind = method["kwargs"].get("kind", "ggn")
    if method.get("warmup", True) and method["cls"] not in ("CG", "LiSSA", "Arnoldi"):
        small = tuple(t[:64] for t in train)
        inv = _build_inverse(method["cls"], method["kwargs"])
        inv.fit(ik.Curvature(target, small, kind=kind), runtime)
        ik.Influence(target, inv).pairwise(tuple(t[:n_query_warm] for t in query), small, runtime)
    inverse = _build_inverse(method["cls"], method["kwargs"])
    curvature = ik.Curvature(target, train, kind=kind)
    scorer = ik.Influence(target, inverse)
    with MemoryMeter(device) as meter:
        t0 = time.perf_counter()
        inverse.fit(curvature, runtime)
        t1 = time.perf_counter()
        scores = scorer.pairwise(query, train, runtime)
        t2 = time.perf_counter()
    # kronfluence's convention: training gradients of the loss alone (no ∇R)
    loss_only = ik.Influence(target, inverse, include_regularizer=False)
    return {"fit_s": t1 - t0, "score_s": t2 - t1, "peak_mb": meter.peak_mb,
            "scores": scores.double().cpu().numpy(),
            "scores_lossgrad": loss_only.pairwise(query, train, runtime).double().cpu().numpy(),
            "info": _short_info(inverse)}


def _short_info(inverse) -> dict:
    info = {}
    for key in ("residual", "max_residual", "kept_fraction", "spectrum_kept", "converged",
                "diverged", "labels"):
        if key in inverse.fit_info_:
            value = inverse.fit_info_[key]
            if isinstance(value, (int, float, str, bool)):
                info[key] = value
    return info


def run_kronfluence(method: dict, spec: dict, device: str, damping: float) -> dict:
    from _kronfluence import Session  # benchmarks/ is on sys.path when run as a script
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    model, train, query = load_task(spec)
    train_set, query_set = TensorDataset(*train), TensorDataset(*query)
    factor_args = FactorArguments(strategy=method["kron"],
                                  use_empirical_fisher=method["empirical"])
    score_args = ScoreArguments(damping_factor=damping)
    n_query = len(query[0])
    with Session(model, device) as session:
        small = TensorDataset(*(t[:64] for t in train))
        session.fit_and_score("warmup", small, TensorDataset(*(t[:2] for t in query)), 2,
                              factor_args, score_args)
        with MemoryMeter(device) as meter:
            fit_s, score_s, scores = session.fit_and_score("full", train_set, query_set, n_query,
                                                           factor_args, score_args)
    scores = scores.double().cpu().numpy()
    return {"fit_s": fit_s, "score_s": score_s, "peak_mb": meter.peak_mb, "scores": scores,
            "scores_lossgrad": scores, "info": {"damping_factor": damping}}


def worker(spec_path: str) -> None:
    job = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(job["threads"])
    method, spec = job["method"], job["task"]
    if "kron" in method:
        result = run_kronfluence(method, spec, job["device"], job["damping"] + spec["l2"])
    else:
        result = run_ours(method, spec, job["device"])
    out = Path(job["out"])
    np.save(out.with_suffix(".scores.npy"), result.pop("scores"))
    np.save(out.with_suffix(".lossgrad.npy"), result.pop("scores_lossgrad"))
    out.write_text(json.dumps(result))


def run_method(method: dict, spec: dict, args, folder: Path) -> dict:
    safe = "".join(c if c.isalnum() else "_" for c in method["method"])
    out = folder / f"{safe}.json"
    job = {"method": method, "task": spec, "device": args.device, "threads": args.threads,
           "damping": args.damping, "out": str(out)}
    job_path = folder / f"{safe}.job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--worker", str(job_path)], env=env,
                              capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    result = json.loads(out.read_text())
    result["scores"] = np.load(out.with_suffix(".scores.npy"))
    result["scores_lossgrad"] = np.load(out.with_suffix(".lossgrad.npy"))
    return result


# ---------------------------------------------------------------------------------------------
# metrics and report
# ---------------------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return ik.evaluation.pearson(a, b)


def mean_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries of Spearman across training examples; a query whose scores are constant
    in either matrix (e.g. a float32 query gradient that is exactly zero) is left out."""
    values = [ik.evaluation.spearman(x, y) for x, y in zip(a, b, strict=True)]
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def constant_queries(scores: np.ndarray) -> int:
    return int((np.ptp(scores, axis=1) == 0).sum())


def run_task(spec: dict, args, folder: Path) -> tuple[list[dict], dict]:
    rows, results = [], {}
    n_query = None
    for method in method_specs(args, spec):
        t0 = time.perf_counter()
        result = run_method(method, spec, args, folder)
        results[method["method"]] = result
        print(f"[{spec['task']}] {method['method']}: "
              f"{result.get('error') or 'ok'} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        exact = results.get("Exact", {})
        row = {"task": spec["task"], "method": method["method"]}
        if "error" in result:
            row.update(fit_s=None, query_s=None, peak_mb=None, pearson_vs_exact=None,
                       spearman_vs_exact=None, error=result["error"])
            rows.append(row)
            continue
        n_query = result["scores"].shape[0]
        row.update(fit_s=result["fit_s"], query_s=result["score_s"] / n_query,
                   peak_mb=result["peak_mb"])
        if "scores" in exact:
            row["pearson_vs_exact"] = pearson(result["scores"], exact["scores"])
            row["spearman_vs_exact"] = mean_spearman(result["scores"], exact["scores"])
            row["pearson_vs_exact_lossgrad"] = pearson(result["scores_lossgrad"],
                                                       exact["scores_lossgrad"])
            if constant_queries(result["scores"]):
                row["constant_queries"] = constant_queries(result["scores"])
        row.update({k: v for k, v in result.get("info", {}).items()})
        rows.append(row)
    return rows, results


def comparisons(task: str, results: dict) -> list[dict]:
    """Agreement and time ratios of our K-FAC family with kronfluence's (same labels)."""
    pairs = [("EKFAC_sampled", "kronfluence_ekfac"), ("KFAC_sampled", "kronfluence_kfac"),
             ("EKFAC", "kronfluence_ekfac"), ("KFAC", "kronfluence_kfac"),
             ("EKFAC_empirical", "kronfluence_ekfac_empirical")]
    out = []
    for ours, theirs in pairs:
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "scores" not in a or "scores" not in b:
            continue
        out.append({"task": task, "ours": ours, "kronfluence": theirs,
                    "pearson": pearson(a["scores_lossgrad"], b["scores"]),
                    "spearman": mean_spearman(a["scores_lossgrad"], b["scores"]),
                    "time_ratio": (a["fit_s"] + a["score_s"]) / (b["fit_s"] + b["score_s"])})
    return out


def _fmt(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def markdown(rows: list[dict], comps: list[dict], notes: list[str]) -> str:
    lines = [f"- {n}" for n in notes] + [""]
    lines.append("| task | method | fit_s | query_s | peak_mb | pearson_vs_exact | "
                 "spearman_vs_exact | pearson (loss-only grads) | notes |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    keys = ("fit_s", "query_s", "peak_mb", "pearson_vs_exact", "spearman_vs_exact",
            "pearson_vs_exact_lossgrad")
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in keys + ("task", "method")}
        lines.append(f"| {r['task']} | {r['method']} | "
                     + " | ".join(_fmt(r.get(k)) for k in keys)
                     + f" | {', '.join(f'{k}={_fmt(v)}' for k, v in extra.items())} |")
    if comps:
        lines += ["", "| task | ours | kronfluence | Pearson(ours, kf) | Spearman(ours, kf) | "
                  "time ours / kf (fit + score) |", "| --- | --- | --- | ---: | ---: | ---: |"]
        for c in comps:
            lines.append(f"| {c['task']} | {c['ours']} | {c['kronfluence']} | "
                         f"{_fmt(c['pearson'])} | {_fmt(c['spearman'])} | "
                         f"{_fmt(c['time_ratio'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print rows as a JSON list")
    p.add_argument("--task", default="all", choices=["digits", "fashion", "all"])
    p.add_argument("--n-query", type=int, default=50)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--l2", type=float, default=1e-3, help="L2 strength of the training loss")
    p.add_argument("--damping", type=float, default=1e-3, help="λ for every method")
    p.add_argument("--rank", type=int, default=100, help="Arnoldi rank")
    p.add_argument("--cg-iter", type=int, default=500)
    p.add_argument("--lissa-scale", type=float, default=50.0)
    p.add_argument("--lissa-depth", type=int, default=1000)
    p.add_argument("--lissa-batch", type=int, default=64,
                   help="examples per LiSSA curvature product (stochastic mode)")
    p.add_argument("--fashion-train", type=int, default=500)
    p.add_argument("--fashion-epochs", type=int, default=5)
    p.add_argument("--fashion-lbfgs", type=int, default=300, help="L-BFGS iterations (eval mode)")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--methods", default="", help="comma-separated subset of method labels")
    p.add_argument("--skip-kronfluence", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=int, default=600, help="seconds per method")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if not args.skip_kronfluence:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            print("kronfluence is not installed (pip install 'influencekit[bench]'); its rows "
                  "are skipped", file=sys.stderr)
            args.skip_kronfluence = True
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, comps, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for task in (["digits", "fashion"] if args.task == "all" else [args.task]):
            prepare = prepare_digits if task == "digits" else prepare_fashion
            spec = prepare(args, Path(tmp) / task)
            if spec is None:
                notes.append(f"{task}: skipped (data set not installed)")
                continue
            task_rows, results = run_task(spec, args, Path(tmp) / task)
            rows += task_rows
            comps += comparisons(task, results)
            notes.append(f"{task}: {spec['note']}")
    notes.append(f"damping λ = {args.damping} for every method (kronfluence: damping_factor = "
                 f"λ + l2 = {args.damping + args.l2}); device {args.device}, {args.threads} "
                 f"thread(s); total wall time {time.perf_counter() - start:.0f} s")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        for c in comps:
            rows.append({"task": c["task"], "method": f"agreement:{c['ours']}~{c['kronfluence']}",
                         "fit_s": None, "query_s": None, "peak_mb": None,
                         "pearson_vs_exact": None, "spearman_vs_exact": None, **c})
        print(json.dumps(rows, indent=1))
    else:
        print(markdown(rows, comps, notes))


if __name__ == "__main__":
    main()
