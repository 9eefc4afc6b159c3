"""Per-example gradients: the gradient engine's hooks, vmap and loop against a plain batched
forward+backward of the same model (time ratios measured in the same run).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/hook_gradients.py [--json] [--repeats 3]

Models (float32, batch 256): a 64-128-128-10 MLP on 2,048 inputs, a 2-conv CNN on 512 28x28
inputs, and a tiny BERT sequence classifier (transformers config: 2 layers, hidden 64, 4 heads,
sequences of 32 tokens with padding, 512 examples; skipped without transformers). Every figure
is a full pass over the data through the public API (``ik.grads.iter_gradients`` with
``Runtime(engine=...)``; rows consumed and dropped, as a scorer does); the baseline is one
``loss.backward()`` per batch on the batch's summed loss. Each time is the best of ``--repeats``
passes. ``max abs diff`` is the largest difference of the engine's gradients from the loop's on
the first batch.
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
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def plain_backward(target, data, batch_size: int) -> None:
    """The baseline: one forward and one backward of the summed loss per batch."""
    loader = ik.grads.as_loader(data, ik.Runtime(batch_size=batch_size, progress=False))
    params = target.params()
    live = {n: p.requires_grad_(True) for n, p in params.items()}
    for batch in loader:
        target.losses(live, batch).sum().backward()


def engine_pass(target, data, engine: str, batch_size: int) -> None:
    runtime = ik.Runtime(batch_size=batch_size, engine=engine, progress=False)
    for _ in ik.grads.iter_gradients(target, data, runtime):
        pass


def first_batch_difference(target, data, engine: str, batch_size: int) -> float:
    first = ik.grads.take(data, range(min(batch_size, ik.grads.num_examples(data))))
    reference = ik.grads.gradients(target, first, ik.Runtime(engine="loop", progress=False))
    got = ik.grads.gradients(target, first, ik.Runtime(engine=engine, progress=False))
    return float((got - reference).abs().max())


def cases(include_bert: bool):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    x = torch.randn(2048, 64)
    yield "mlp", ik.Target(mlp, ik.ClassificationTask()), (x, torch.randint(0, 10, (2048,)))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    x = torch.randn(512, 1, 28, 28)
    yield "cnn", ik.Target(cnn, ik.ClassificationTask()), (x, torch.randint(0, 10, (512,)))
    if include_bert:
        yield "tiny_bert", *tiny_bert()


def tiny_bert(n: int = 512, length: int = 32):
    import transformers

    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (n, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    data = {"input_ids": ids * mask, "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=gen)}
    # the encoder and head, as influence on a transformer is usually taken
    target = ik.Target(model, ik.SequenceClassificationTask(),
                       params=["bert.encoder", "bert.pooler", "classifier"])
    return target, data


def measure(name, target, data, batch_size: int, repeats: int) -> dict:
    n = ik.grads.num_examples(data)
    row = {"model": name, "p": target.num_params, "n": n}
    base = best_time(lambda: plain_backward(target, data, batch_size), repeats)
    row["forward_backward_s"] = base
    for engine in ("hooks", "vmap", "loop"):
        subset = data if engine != "loop" else ik.grads.take(data, range(min(n, 128)))
        scale = n / ik.grads.num_examples(subset)  # the loop is timed on 128 examples
        try:
            seconds = best_time(lambda s=subset, e=engine: engine_pass(target, s, e, batch_size),
                                1 if engine == "loop" else repeats) * scale
        except ik.errors.InfluenceKitError as exc:
            row[f"{engine}_s"] = None
            row[f"{engine}_note"] = str(exc).split(":")[0]
            continue
        row[f"{engine}_s"] = seconds
        row[f"{engine}_over_forward_backward"] = seconds / base
        if engine != "loop":
            row[f"{engine}_max_abs_diff"] = first_batch_difference(target, data, engine,
                                                                   batch_size)
    if row.get("vmap_s"):
        row["vmap_over_hooks"] = row["vmap_s"] / row["hooks_s"]
    return row


def markdown(rows: list[dict]) -> str:
    def fmt(v):
        return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = ["| model | p | n | fwd+bwd s | hooks s | hooks / fwd+bwd | vmap / hooks | "
             "loop / fwd+bwd | max abs diff (hooks, vmap) vs loop |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        vmap = fmt(r.get("vmap_over_hooks")) if r.get("vmap_s") else r.get("vmap_note", "–")
        lines.append(
            f"| {r['model']} | {r['p']:,} | {r['n']} | {fmt(r['forward_backward_s'])} | "
            f"{fmt(r.get('hooks_s'))} | {fmt(r.get('hooks_over_forward_backward'))} | {vmap} | "
            f"{fmt(r.get('loop_over_forward_backward'))} | "
            f"{fmt(r.get('hooks_max_abs_diff'))}, {fmt(r.get('vmap_max_abs_diff'))} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-bert", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows = [measure(name, target, data, args.batch_size, args.repeats)
            for name, target, data in cases(not args.no_bert)]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"threads {torch.get_num_threads()}, load average at start {load:.2f}")
        print(markdown(rows))


if __name__ == "__main__":
    main()
