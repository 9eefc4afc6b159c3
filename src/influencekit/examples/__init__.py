"""Small, fast, deterministic example problems that the shipped CLI configs point to.

Each module has a ``data(...)`` factory returning a :class:`~influencekit.cli.RunData` and a
``model(train, ...)`` factory returning a trained ``nn.Module``; the configs in
``influencekit/examples/configs/`` name them by import path
(``influencekit.examples.digits:model``).
Run one with ``influencekit fit digits --store runs/digits``.
"""
