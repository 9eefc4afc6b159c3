"""DistContext: who this process is in a run, and the few collectives influencekit needs.

One process by default (every collective is then a no-op that returns its input). Under
``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), :meth:`DistContext.from_env` joins the process group: gloo when computing on
CPU, nccl on CUDA; an already initialised default process group is used as it is.

All collectives move raw bytes where they can (all_gather, broadcast), so any dtype, float64 and
bfloat16 included, arrives bit for bit; sums are reduced in the tensors' own dtype (float64 stays
float64).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import DistributedError
from .split import assign_owners, contiguous_range

# dtype codes sent ahead of a broadcast so that a receiver needs no shape or dtype in advance
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


class DistContext:
    """This process's place in a run: ``rank`` of ``world_size``, and the device it computes on.

    Build it with :meth:`from_env` (joins torchrun's process group when there is one); the
    constructor only stores its arguments (``DistContext()`` is a single process on CPU).
    Use it as a context manager, or call :meth:`close`, to leave a process group it created.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 owns_group: bool = False):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.owns_group = owns_group

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str | torch.device | None = None, backend: str | None = None,
                 timeout_s: float = 600.0) -> DistContext:
        """Join the run this process was started in.

        - a default process group is already initialised: use it (it is left open on close);
        - ``WORLD_SIZE`` > 1 in the environment (torchrun): initialise one with ``backend``
          (default gloo for CPU, nccl for CUDA) and ``env://`` rendezvous;
        - otherwise: a single process.

        ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available and the backend is not
        gloo, else CPU.
        """
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend()
            return cls(dist.get_rank(), dist.get_world_size(),
                       _default_device(device, backend, _env_int("LOCAL_RANK", 0)))
        world_size = _env_int("WORLD_SIZE", 1)
        if world_size < 1:
            raise DistributedError(f"WORLD_SIZE={world_size} in the environment is not positive.")
        if world_size == 1:
            return cls(0, 1, torch.device(device) if device is not None else "cpu")
        if not dist.is_available():
            raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                                   "install a torch with distributed support or run one process.")
        rank = _env_int("RANK", None)
        local_rank = _env_int("LOCAL_RANK", 0)
        if rank is None or not 0 <= rank < world_size:
            raise DistributedError(
                f"RANK={os.environ.get('RANK')!r} is missing or outside 0..{world_size - 1} "
                f"(WORLD_SIZE={world_size}); start the processes with torchrun.")
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedError(f"{var} is not set; start the processes with torchrun "
                                       "(e.g. torchrun --standalone --nproc_per_node=N ...).")
        backend = backend or _default_backend(device)
        device = _default_device(device, backend, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        return cls(rank, world_size, device, owns_group=True)

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # -- who does what ------------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes shared files and prints)."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)``; the first ``n % world_size`` ranks get
        one item more (10 items on 3 ranks: 0..3, 4..6, 7..9)."""
        return contiguous_range(n, self.world_size, self.rank)

    def module_owners(self, names: Sequence[str],
                      costs: Sequence[float] | None = None) -> dict[str, int]:
        """``{name: rank}``: who computes each module's work, balancing ``costs``."""
        return assign_owners(names, self.world_size, costs)

    def for_modules(self, names: Sequence[str],
                    costs: Sequence[float] | None = None) -> list[str]:
        """The names this rank owns (in the given order), e.g. the per-module
        eigendecompositions it computes before :meth:`broadcast_from_owners` shares them."""
        owners = self.module_owners(names, costs)
        return [n for n in names if owners[n] == self.rank]

    # -- collectives --------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum_(self, tensors):
        """Sum a tensor, or a list/tuple/dict of tensors, over all ranks IN PLACE; returns it.

        Each dtype is reduced in itself (float64 sums stay float64; integer counts stay exact).
        Tensors of one dtype are packed into one buffer, so one call costs one collective per
        dtype.
        """
        items = _tensor_list(tensors)
        if not self.is_distributed:
            return tensors
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in items:
            if t.dtype == torch.bool:
                raise DistributedError("cannot sum boolean tensors; convert them to int64 counts.")
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape).to(t.device, dtype))
                offset += n
        return tensors

    def sum(self, value: int | float) -> int | float:
        """A Python number summed over ranks (int stays int, float is summed in float64)."""
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        t = torch.tensor([value], dtype=dtype)
        self.all_reduce_sum_(t)
        return t.item()

    def all_gather_rows(self, block: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's ``[n_rank, *rest]`` block in rank order: ``[Σ n_rank, *rest]``.

        Blocks may differ in length (also be empty) but must agree in ``rest`` and dtype.
        Every rank gets the whole result, bit for bit (bytes are sent, not numbers).
        """
        if not self.is_distributed:
            return block
        rows = torch.tensor([block.shape[0]], dtype=torch.int64, device=self.device)
        all_rows = [torch.zeros_like(rows) for _ in range(self.world_size)]
        dist.all_gather(all_rows, rows)
        counts = [int(r.item()) for r in all_rows]
        row_shape = tuple(block.shape[1:])
        self._check_same_layout(row_shape, block.dtype)
        row_bytes = _row_bytes(row_shape, block.dtype)
        longest = max(counts)
        payload = torch.zeros(longest * row_bytes, dtype=torch.uint8, device=self.device)
        mine = _as_bytes(block)
        payload[:mine.numel()] = mine
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload)
        parts = [_from_bytes(g[:c * row_bytes], (c, *row_shape), block.dtype)
                 for g, c in zip(gathered, counts, strict=True)]
        return torch.cat(parts).to(block.device)

    def broadcast(self, tensor: torch.Tensor | None, src: int) -> torch.Tensor:
        """``tensor`` of rank ``src`` on every rank (others may pass ``None``: the shape and
        dtype are sent first). Returns a new tensor on non-source ranks, ``tensor`` on ``src``."""
        if not 0 <= src < self.world_size:
            raise DistributedError(f"broadcast source rank {src} is outside "
                                   f"0..{self.world_size - 1}.")
        if not self.is_distributed:
            if tensor is None:
                raise DistributedError("broadcast from this single process got no tensor.")
            return tensor
        if self.rank == src:
            if tensor is None:
                raise DistributedError(f"rank {src} is the broadcast source but passed no tensor.")
            header = torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape],
                                  dtype=torch.int64)
        else:
            header = None
        header = self._broadcast_header(header, src)
        dtype, shape = _DTYPES[int(header[0])], tuple(int(s) for s in header[2:])
        if self.rank == src:
            payload = _as_bytes(tensor)
        else:
            payload = torch.empty(_row_bytes(shape, dtype), dtype=torch.uint8, device=self.device)
        dist.broadcast(payload, src)
        if self.rank == src:
            return tensor
        return _from_bytes(payload, shape, dtype)

    def broadcast_from_owners(self, owned: dict[str, torch.Tensor],
                              owners: dict[str, int]) -> dict[str, torch.Tensor]:
        """Every rank gets every ``{name: tensor}``; each tensor comes from its owner's ``owned``.

        ``owners`` is :meth:`module_owners`' answer (the same on every rank); the result follows
        its order.
        """
        missing = [n for n, r in owners.items() if r == self.rank and n not in owned]
        if missing:
            raise DistributedError(f"rank {self.rank} owns {missing} but did not compute them.")
        return {name: self.broadcast(owned.get(name) if rank == self.rank else None, rank)
                for name, rank in owners.items()}

    # -- helpers ------------------------------------------------------------------------------
    def _broadcast_header(self, header: torch.Tensor | None, src: int) -> torch.Tensor:
        length = torch.tensor([0 if header is None else header.numel()], dtype=torch.int64,
                              device=self.device)
        dist.broadcast(length, src)
        if header is None:
            header = torch.empty(int(length.item()), dtype=torch.int64, device=self.device)
        else:
            header = header.to(self.device)
        dist.broadcast(header, src)
        return header.cpu()

    def _check_same_layout(self, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        mine = torch.tensor([_DTYPES.index(dtype), len(row_shape), *row_shape],
                            dtype=torch.int64)
        first = self._broadcast_header(mine if self.rank == 0 else None, 0)
        if not torch.equal(first, mine):
            raise DistributedError(
                f"rank {self.rank} gathers rows of shape {row_shape} and dtype {dtype}, rank 0 "
                f"rows of shape {tuple(int(s) for s in first[2:])} and dtype "
                f"{_DTYPES[int(first[0])]}; every rank must gather rows of one layout.")


def _tensor_list(tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, dict):
        values = list(tensors.values())
    elif isinstance(tensors, (list, tuple)):
        values = list(tensors)
    else:
        raise DistributedError(f"expected a tensor or a list/tuple/dict of tensors, got "
                               f"{type(tensors).__name__}.")
    if not all(isinstance(t, torch.Tensor) for t in values):
        raise DistributedError("every value to reduce must be a tensor.")
    return values


def _row_bytes(row_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in row_shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8)


def _from_bytes(payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
                ) -> torch.Tensor:
    if dtype == torch.bool:
        return payload.clone().view(shape).to(torch.bool)
    return payload.clone().view(dtype).view(shape)


def _env_int(name: str, default):
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer; "
                               "start the processes with torchrun.") from None


def _default_backend(device) -> str:
    if device is not None:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def _default_device(device, backend: str, local_rank: int) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", local_rank)
        return device
    if backend != "gloo" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
