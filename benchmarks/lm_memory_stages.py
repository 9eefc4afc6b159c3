"""Resident memory of our EK-FAC on SmolLM2-135M's MLP layers, stage by stage (issue 9).

Fit, query preparation and one pass over the training data, each with the kernel's high-water
mark reset at its start (``/proc/self/clear_refs``); printed as MB above the resident memory
once the model and data are loaded. Linux only (reads ``/proc/self/status``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_memory_stages.py \\
        [--layers 30] [--train 16] [--query 10] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from language_models import kjv_token_chunks, smollm2_modules  # noqa: E402

import influencekit as ik  # noqa: E402


def status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--train", type=int, default=16)
    p.add_argument("--query", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ids = kjv_token_chunks(ik.data.smollm2_tokenizer(), args.train + args.query, 32)
    mask = torch.ones_like(ids)
    train = ik.grads.DictDataset({"input_ids": ids[:args.train],
                                  "attention_mask": mask[:args.train]})
    query = ik.grads.DictDataset({"input_ids": ids[args.train:],
                                  "attention_mask": mask[args.train:]})
    model, _ = ik.data.load_smollm2()
    target = ik.Target(model.eval(), ik.CausalLMTask(), params=smollm2_modules(args.layers))
    runtime = ik.Runtime(batch_size=args.batch_size, progress=False)
    base = status_mb("VmRSS")
    print(f"p = {target.num_params:,}; resident with model and data: {base:.0f} MB")

    def stage(name, fn):
        reset_high_water_mark()
        start = time.perf_counter()
        out = fn()
        print(f"{name}: {time.perf_counter() - start:.1f} s, peak {status_mb('VmHWM') - base:.0f}"
              f" MB, after {status_mb('VmRSS') - base:.0f} MB (above the loaded model)")
        return out

    inverse = stage("fit", lambda: ik.EKFAC(damping=1e-3, seed=0).fit(
        ik.Curvature(target, train), runtime, stationarity=False))
    influence = ik.Influence(target, inverse, include_regularizer=False)
    prepared = stage("prepare queries", lambda: influence.prepare_queries(query, runtime))
    stage("score the training data", lambda: influence.pairwise_prepared(prepared, train,
                                                                         runtime))


if __name__ == "__main__":
    main()
