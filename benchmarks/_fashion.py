"""A small ResNet (residual blocks with batch norm) on a Fashion-MNIST subset (issue 5)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import nn

FOLDER = Path("/usr/share/datasets/fashion-mnist")


def available() -> bool:
    return (FOLDER / "train-images-idx3-ubyte.gz").exists()


def _read(name: str, offset: int) -> np.ndarray:
    with gzip.open(FOLDER / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_splits(n_train=3000, n_heldout=500, n_pool=1000, seed=0):
    """(train, heldout, pool) of (x [n, 1, 28, 28] float32 in [0, 1], y [n] long); train from
    the training file, held-out and pool from the test file."""
    xtr = _read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    ytr = _read("train-labels-idx1-ubyte.gz", 8)
    xte = _read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    yte = _read("t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(seed)
    a = rng.permutation(len(ytr))[:n_train]
    b = rng.permutation(len(yte))[:n_heldout + n_pool]

    def pack(x, y, idx):
        return (torch.tensor(x[idx] / 255.0, dtype=torch.float32),
                torch.tensor(y[idx].astype(np.int64)))
    return pack(xtr, ytr, a), pack(xte, yte, b[:n_heldout]), pack(xte, yte, b[n_heldout:])


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


def train_resnet(train, epochs=4, lr=3e-3, batch_size=64, seed=0) -> SmallResNet:
    torch.manual_seed(seed)
    model = SmallResNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
