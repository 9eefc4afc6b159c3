"""Per-example gradients: layer hooks vs torch.func vmap (time ratio in the same run).

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/hook_gradients.py

Models: a 64-128-128-10 MLP on 2048 random digits-shaped inputs and a 2-conv CNN on 512
28×28 inputs, float32, batch 256. Each method is timed as the best of 3 full passes; the
largest absolute difference between the two results is reported with the ratio.
"""

import time

import torch
from torch import nn

import influencekit as ik
from influencekit.grads import gradients, hook_gradients


def _best(fn, repeats=3):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    torch.manual_seed(0)
    cases = {
        "mlp": (nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10)), torch.randn(2048, 64)),
        "cnn": (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(16 * 7 * 7, 10)),
                torch.randn(512, 1, 28, 28)),
    }
    runtime = ik.Runtime(batch_size=256)
    print("| model | p | n | vmap s | hooks s | vmap / hooks | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (model, x) in cases.items():
        y = torch.randint(0, 10, (x.shape[0],))
        target = ik.Target(model, ik.ClassificationTask())
        data = (x, y)
        t_vmap, g_vmap = _best(lambda t=target, d=data: gradients(t, d, runtime))
        t_hook, g_hook = _best(lambda t=target, d=data: hook_gradients(t, d, runtime))
        diff = float((g_vmap - g_hook).abs().max())
        print(f"| {name} | {target.num_params} | {x.shape[0]} | {t_vmap:.3f} | {t_hook:.3f} | "
              f"{t_vmap / t_hook:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
