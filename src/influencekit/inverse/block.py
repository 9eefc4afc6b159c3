"""Block-diagonal inverses: each group of parameters gets its own method on its own block of C."""

from __future__ import annotations

import torch

from ..curvature import Curvature
from ..errors import NotFittedError
from ..func.params import ParamSpace
from ..task.regularizer import L2Regularizer
from ..task.target import Target
from .base import REGISTRY, InverseCurvature, check_parameter_grads


class BlockDiagonal(InverseCurvature):
    """``(C + λI)⁻¹`` approximated by inverting each diagonal block of C on its own.

    The parameters are split into groups; group G is fitted with its own method on the curvature
    restricted to G (``C_GG``, the diagonal block: a :class:`Target` with ``params=G``, the same
    data, kind and weights, and the regulariser with the other parameters held fixed), and
    ``solve`` applies each group's inverse to its slice of the gradient. Cross-group curvature is
    ignored, so the result equals the exact inverse exactly when C is block diagonal.

    Args:
        groups: ``{spec: method}`` or a list of ``(spec, method)`` pairs. A spec is a module-name
            prefix (``"encoder.layer1"`` takes every parameter named ``encoder.layer1`` or
            ``encoder.layer1.<...>``; ``""`` takes all) or a list of exact parameter names.
            Each method is any unfitted inverse (``Exact(damping=...)``, ``CG(...)``, ...); it is
            copied, never fitted in place. A parameter matched by two specs is an error.
        default: method for every parameter that no spec takes, ONE BLOCK PER MODULE (the
            parameters directly owned by one module, e.g. a Linear's weight and bias). ``None``
            (default): uncovered parameters are an error. ``block_diagonal(default=Exact(λ))``
            is the exact per-layer (block-diagonal) curvature.

    Damping: each block uses its own method's ``damping``; give them all the same λ for the
    meaning ``(C_GG + λI)⁻¹`` per block. Fitted: ``blocks_`` (fitted sub-inverses) and
    ``fit_info_["blocks"]`` (per block: ``names``, ``source`` and the sub-inverse's fit_info).
    Lazy sub-methods (CG, LiSSA) need :meth:`attach` after loading from a store.
    """

    def __init__(self, groups=None, default=None):
        self.groups = groups
        self.default = default

    # -- configuration ------------------------------------------------------------------------
    def _pairs(self) -> list[tuple[str | list[str], InverseCurvature]]:
        if self.groups is None:
            items = []
        elif isinstance(self.groups, dict):
            items = list(self.groups.items())
        else:
            items = [tuple(pair) for pair in self.groups]
        return [(_spec(spec), _method(m)) for spec, m in items]

    def _default(self):
        return None if self.default is None else _method(self.default)

    def get_config(self) -> dict:
        default = self._default()
        return {"method": type(self).__name__,
                "groups": [[spec, m.get_config()] for spec, m in self._pairs()],
                "default": None if default is None else default.get_config()}

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self, curvature, runtime):
        plan = self._plan(list(curvature.target.space.names))
        pairs, default = self._pairs(), self._default()
        full = curvature.target.space
        self.blocks_, self.indices_, infos = [], [], []
        for names, source in plan:
            method = (default if source < 0 else pairs[source][1]).clone()
            sub = method.fit(restrict(curvature, names), runtime)
            self.blocks_.append(sub)
            self.indices_.append(_indices(full, sub.param_space_.names))
            infos.append({"names": list(sub.param_space_.names), "source": source,
                          "fit_info": sub.fit_info_})
        self.fit_info_["blocks"] = infos

    def _plan(self, names: list[str]) -> list[tuple[list[str], int]]:
        """``[(parameter names, source)]``: source = index into groups, or -1 for default."""
        owner: dict[str, int] = {}
        plan = []
        for i, (spec, _) in enumerate(self._pairs()):
            matched = [n for n in names if _matches(spec, n)]
            if not matched:
                raise ValueError(f"block_diagonal group {spec!r} matches no parameter of the "
                                 f"target; its parameters are {names[:8]}"
                                 f"{' ...' if len(names) > 8 else ''}")
            twice = [n for n in matched if n in owner]
            if twice:
                raise ValueError(f"parameters {twice} are in two block_diagonal groups "
                                 f"(#{owner[twice[0]]} and #{i}); make the groups disjoint.")
            owner.update({n: i for n in matched})
            plan.append((matched, i))
        rest = [n for n in names if n not in owner]
        if rest and self.default is None:
            raise ValueError(f"parameters {rest[:8]} are in no block_diagonal group; add a group "
                             "for them or pass default=<method> (one block per module).")
        modules: dict[str, list[str]] = {}
        for n in rest:
            modules.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
        plan.extend((group, -1) for group in modules.values())
        return plan

    # -- applying -----------------------------------------------------------------------------
    def check_fitted(self) -> None:
        super().check_fitted()
        for block in self.blocks_:
            try:
                block.check_fitted()
            except NotFittedError as exc:
                raise NotFittedError(
                    "a block of this block_diagonal inverse solves with the training data, "
                    "which is not stored: call .attach(ik.Curvature(target, train_data, "
                    "kind=...)) on the block_diagonal inverse before solving.") from exc

    def _solve(self, grads, runtime=None):
        out = torch.empty_like(grads)
        for block, idx in zip(self.blocks_, self.indices_, strict=True):
            idx = idx.to(grads.device)
            out[:, idx] = block.solve(grads[:, idx], runtime)
        return out

    def parameter_blocks_(self) -> list[tuple[str, ...]]:
        """Each group's blocks: a block-diagonal sub-inverse's own blocks, else its whole
        group."""
        InverseCurvature.check_fitted(self)
        out = []
        for block in self.blocks_:
            out.extend(block.parameter_blocks_() or [tuple(block.param_space_.names)])
        return out

    def solve_per_parameter(self, grads, runtime=None):
        """Each group's inverse on its own parameters (see
        :meth:`InverseCurvature.solve_per_parameter`)."""
        self.check_fitted()
        check_parameter_grads(self.param_space_, grads, self.parameter_blocks_())
        out = {}
        for block in self.blocks_:
            mine = {n: grads[n] for n in block.param_space_.names if n in grads}
            if mine:
                out.update(block.solve_per_parameter(mine, runtime))
        return out

    @property
    def damping_(self) -> float:
        """Mean over blocks of their λ (each block's in ``damping_vector_()``)."""
        InverseCurvature.check_fitted(self)
        sizes = [len(idx) for idx in self.indices_]
        total = sum(b.damping_ * n for b, n in zip(self.blocks_, sizes, strict=True))
        return float(total / sum(sizes))

    def damping_vector_(self) -> torch.Tensor:
        out = torch.empty(self.param_space_.numel, dtype=torch.float64)
        for block, idx in zip(self.blocks_, self.indices_, strict=True):
            out[idx] = block.damping_vector_()
        return out

    def clone(self, **changes) -> BlockDiagonal:
        """An unfitted copy; ``damping=λ`` sets λ in every block's method."""
        damping = changes.pop("damping", None)
        if changes:
            raise ValueError(f"block_diagonal has no setting {sorted(changes)}; change its "
                             "groups' methods instead (or damping=, applied to every block)")
        if damping is None:
            return BlockDiagonal(self.groups, self.default)
        pairs = [(spec, m.clone(damping=damping)) for spec, m in self._pairs()]
        default = self._default()
        return BlockDiagonal(pairs, None if default is None else default.clone(damping=damping))

    def attach(self, curvature, runtime=None):
        """Re-attach the curvature to lazy blocks (CG, LiSSA) after loading; returns self."""
        InverseCurvature.check_fitted(self)
        for block in self.blocks_:
            if getattr(block, "lazy", False):
                block.attach(restrict(curvature, block.fit_info_["names"]), runtime)
        return self

    # -- persistence --------------------------------------------------------------------------
    def _state_names(self):
        return [f"block{i}.{name}" for i, b in enumerate(self.blocks_)
                for name in b.state_dict()]

    def state_dict(self):
        """Tensors of every block, named ``block<i>.<name>``."""
        InverseCurvature.check_fitted(self)
        return {f"block{i}.{name}": t for i, b in enumerate(self.blocks_)
                for name, t in b.state_dict().items()}

    def load_state_dict(self, tensors, fit_info):
        pairs, default = self._pairs(), self._default()
        self.blocks_, self.indices_ = [], []
        full = _space_of(fit_info)
        for i, info in enumerate(fit_info["blocks"]):
            method = (default if info["source"] < 0 else pairs[info["source"]][1]).clone()
            prefix = f"block{i}."
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            self.blocks_.append(method.load_state_dict(mine, info["fit_info"]))
            self.indices_.append(_indices(full, info["names"]))
        self.fit_info_ = dict(fit_info)
        return self


def block_diagonal(groups=None, default=None) -> BlockDiagonal:
    """A :class:`BlockDiagonal` inverse: ``block_diagonal({"fc1": Exact(1e-3), "fc2": CG(1e-3)})``
    or ``block_diagonal(default=Exact(1e-3))`` for the exact per-layer curvature."""
    return BlockDiagonal(groups=groups, default=default)


def restrict(curvature: Curvature, names: list[str]) -> Curvature:
    """The diagonal block of ``curvature`` for the parameters ``names`` (same data and kind).

    The regulariser is evaluated with the other parameters fixed at their current values, so its
    Hessian is the matching diagonal block of ∇²R.
    """
    target = curvature.target
    sub_target = Target(target.model, target.task, params=list(names),
                        regularizer=_restricted_regularizer(target, list(names)))
    return Curvature(sub_target, curvature.data, curvature.kind, curvature.weights,
                     n_samples=curvature.n_samples, seed=curvature.seed)


def _restricted_regularizer(target: Target, names: list[str]):
    reg = target.regularizer
    if reg is None:
        return None
    if isinstance(reg, L2Regularizer):  # stays an L2Regularizer (K-FAC reads its strength)
        covered = [n for n in names if reg.names is None or n in reg.names]
        return L2Regularizer(reg.strength, names=covered) if covered else None
    fixed = target.params()

    def regularizer(sub):
        some = next(iter(sub.values()))
        merged = {n: v.to(dtype=some.dtype, device=some.device) for n, v in fixed.items()}
        merged.update(sub)
        return target.regularizer(merged)
    return regularizer


def _spec(spec):
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        return list(spec)
    raise TypeError(f"a block_diagonal group is a module-name prefix (str) or a list of "
                    f"parameter names, got {spec!r}")


def _method(method) -> InverseCurvature:
    if isinstance(method, InverseCurvature):
        return method
    if isinstance(method, dict) and method.get("method") in REGISTRY:
        config = dict(method)
        return REGISTRY[config.pop("method")](**config)
    raise TypeError(f"a block_diagonal method must be an inverse such as Exact(damping=...), "
                    f"got {method!r}")


def _matches(spec, name: str) -> bool:
    if isinstance(spec, list):
        return name in spec
    return spec == "" or name == spec or name.startswith(spec + ".")


def _indices(space, names) -> torch.Tensor:
    slices = space.slices()
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


def _space_of(fit_info):
    return ParamSpace(tuple(fit_info["names"]), tuple(tuple(s) for s in fit_info["shapes"]))
