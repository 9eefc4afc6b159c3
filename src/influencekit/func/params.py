"""A fixed ordering of named parameters, and conversions between dicts and one flat vector.

The flat vector of p numbers is the coordinate system of every influencekit curvature and
gradient: ``[..., p]`` tensors are always laid out in :attr:`ParamSpace.names` order, each tensor
flattened in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch


@dataclass(frozen=True)
class ParamSpace:
    """Names and shapes of the parameters that influence is taken with respect to."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor]) -> ParamSpace:
        return cls(tuple(params), tuple(tuple(t.shape) for t in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """p, the length of the flat parameter vector."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        """Where each named parameter lives in the flat vector."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """``{name: [*batch, *shape]}`` -> ``[*batch, p]``."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[*batch, p]`` -> ``{name: [*batch, *shape]}`` (views of ``flat``)."""
        batch = flat.shape[:-1]
        # one split, not one slice per parameter: the backward of a split concatenates the
        # parts once (O(p)), while each slice's backward writes a zero-padded [p] gradient
        # (O(p · number of tensors), seconds per step on a 100-tensor transformer)
        parts = torch.split(flat, list(self.sizes), dim=-1)
        return {name: part.reshape(*batch, *shape)
                for name, part, shape in zip(self.names, parts, self.shapes, strict=True)}
