"""A small ResNet (residual blocks with batch norm) on a Fashion-MNIST subset (issue 5)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

FOLDER = Path("/usr/share/datasets/fashion-mnist")
CACHE = Path(__file__).parent / ".cache"


def available() -> bool:
    return (FOLDER / "train-images-idx3-ubyte.gz").exists()


def _read(name: str, offset: int) -> np.ndarray:
    with gzip.open(FOLDER / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_splits(n_train=3000, n_heldout=500, n_pool=1000, seed=0):
    """(train, heldout, pool) of (x [n, 1, 28, 28] float32 in [0, 1], y [n] long); train from
    the training file, held-out and pool from the test file."""
    train, rest = _draw(n_train, n_heldout + n_pool, seed)
    heldout = (rest[0][:n_heldout], rest[1][:n_heldout])
    return train, heldout, (rest[0][n_heldout:], rest[1][n_heldout:])


def correction_splits(n_train=3000, n_heldout=500, n_pool=1500, seed=0) -> dict:
    """Disjoint sets for the correction benchmark: ``train`` (training file); ``heldout_val``,
    ``heldout_test`` (collateral damage of corrections chosen on / reported on) and ``pool``
    (test images whose mispredictions are corrected) from the test file."""
    train, rest = _draw(n_train, 2 * n_heldout + n_pool, seed)
    cuts = {"heldout_val": (0, n_heldout), "heldout_test": (n_heldout, 2 * n_heldout),
            "pool": (2 * n_heldout, 2 * n_heldout + n_pool)}
    return {"train": train, **{k: (rest[0][a:b], rest[1][a:b]) for k, (a, b) in cuts.items()}}


def _draw(n_train, n_test, seed):
    xtr = _read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    ytr = _read("train-labels-idx1-ubyte.gz", 8)
    xte = _read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    yte = _read("t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(seed)
    a = rng.permutation(len(ytr))[:n_train]
    b = rng.permutation(len(yte))[:n_test]

    def pack(x, y, idx):
        return (torch.tensor(x[idx] / 255.0, dtype=torch.float32),
                torch.tensor(y[idx].astype(np.int64)))
    return pack(xtr, ytr, a), pack(xte, yte, b)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Block(width, width, 2)
        self.block2 = Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        h = self.block2(self.block1(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


def conv_and_fc(model: nn.Module) -> list[str]:
    """Names of every Conv2d and Linear module (all convolutions and the classifier; the batch
    norms are left out: their statistics are frozen in eval mode)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def train_resnet(train, epochs=4, lr=3e-3, batch_size=64, seed=0) -> SmallResNet:
    """Adam on the mean cross-entropy through the library's loop (``ik.response.train``), batch
    norm in training mode (its running statistics are updated in place), then eval mode.
    The weights are cached as safetensors under ``benchmarks/.cache`` (keyed by the data and
    settings)."""
    import hashlib

    from safetensors.torch import load_file, save

    import influencekit as ik
    from influencekit.storage import atomic_write

    key = hashlib.sha256(repr((train[0].sum().item(), train[1].tolist(), epochs, lr, batch_size,
                               seed)).encode()).hexdigest()[:12]
    path = CACHE / f"fashion-resnet-{key}.safetensors"
    torch.manual_seed(seed)
    model = SmallResNet()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    target = ik.Target(model, ik.ClassificationTask())
    schedule = ik.response.batch_schedule(len(train[1]), batch_size=batch_size, seed=seed,
                                          epochs=epochs)
    model.train()
    result = ik.response.train(target, train, schedule, optimizer="adam", lr=lr,
                               desc="training the ResNet")
    ik.write_params(target, result.params)
    CACHE.mkdir(exist_ok=True)
    atomic_write(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model.eval()
