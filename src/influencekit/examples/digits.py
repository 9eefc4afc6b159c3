"""Digits MLP: scikit-learn's bundled 8x8 digits and a small tanh MLP trained deterministically.

``data(n_train)`` splits the 1,797 digits at random (fixed seed) into ``n_train`` training images
and the rest as candidate queries (the test images), named ``test image #i`` by their position in
the test split, as the demo's terminal output names them. ``model(train, ...)`` trains a
64-hidden-10 MLP with full-batch Adam on the mean cross-entropy plus (l2_strength/2)‖θ‖² in
float64 (seeded: the same arguments give the same parameters, bit for bit).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..cli.rundata import RunData
from ..data import load_digits_split
from ..response import batch_schedule, train, write_params
from ..runtime import Runtime
from ..task import ClassificationTask, L2Regularizer, Target

log = logging.getLogger(__name__)


def data(n_train: int = 1200, seed: int = 0) -> RunData:
    """Training images ``(x [n_train, 64], y [n_train])`` and test images as queries."""
    split = load_digits_split(n_train=n_train, seed=seed)
    n_test = split.x_test.shape[0]
    return RunData(train=(split.x_train, split.y_train), query=(split.x_test, split.y_test),
                   train_ids=[f"train image #{i}" for i in range(n_train)],
                   query_ids=[f"test image #{i}" for i in range(n_test)],
                   display={"kind": "image", "image_shape": list(split.image_shape)},
                   classes=[str(c) for c in range(10)])


def mlp(n_inputs: int, hidden: int, n_classes: int) -> nn.Sequential:
    """``Linear(n_inputs, hidden) -> tanh -> Linear(hidden, n_classes)`` in float64."""
    return nn.Sequential(nn.Linear(n_inputs, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_classes)).double()


def train_mlp(x, y, hidden: int = 32, l2_strength: float = 1e-3, epochs: int = 500,
              lr: float = 0.01, seed: int = 0, runtime: Runtime | None = None) -> nn.Module:
    """Full-batch Adam on mean cross-entropy + (l2_strength/2)‖θ‖², float64, seeded, through
    the library's training loop (:func:`influencekit.response.train`)."""
    torch.manual_seed(seed)
    net = mlp(x.shape[1], hidden, int(y.max()) + 1)
    target = Target(net, ClassificationTask(), regularizer=L2Regularizer(l2_strength))
    schedule = batch_schedule(len(y), batch_size=None, epochs=epochs)
    result = train(target, (x, y), schedule, optimizer="adam", lr=lr, runtime=runtime,
                   desc="training MLP")
    write_params(target, result.params)
    return net


def model(train, hidden: int = 32, l2_strength: float = 1e-3, epochs: int = 500,
          lr: float = 0.01, seed: int = 0) -> nn.Module:
    """The trained digits MLP (``train = (x, y)`` from :func:`data`)."""
    x, y = train
    log.info("training the digits MLP 64-%d-10 for %d epochs", hidden, epochs)
    return train_mlp(x, y, hidden, l2_strength, epochs, lr, seed,
                     runtime=Runtime(progress=False))
