"""Runs over several processes: the only package that imports ``torch.distributed``.

- :class:`DistContext`: rank / world size, contiguous shards, module owners, all-reduce sums,
  all-gather of row blocks, broadcasts. One process by default; under ``torchrun`` it joins the
  process group (gloo on CPU, nccl on CUDA).
- :class:`Partition`: ``"3/8"`` for job arrays whose workers cannot talk; each job writes a
  partial store and ``influencekit.storage.merge_score_stores`` combines them.
"""

from .context import DistContext
from .partition import Partition
from .split import assign_owners, contiguous_range

__all__ = ["DistContext", "Partition", "contiguous_range", "assign_owners"]
