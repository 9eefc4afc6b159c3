"""One rank of a distributed run, launched by tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node=N tests/scale_dist_worker.py OUT

(or plainly ``python tests/scale_dist_worker.py OUT`` for the one-process reference). Every rank
writes ``OUT/rank{r}.safetensors`` with what it ends up holding; the test compares them with one
process and with independent answers.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import influencekit as ik
from influencekit.distributed import DistContext
from influencekit.errors import StoreError
from scale_problem import build_kfac_problem, build_problem, sharded_fits


def count_eigh(fn):
    """``(fn(), number of torch.linalg.eigh calls it made in this process)``."""
    calls = []
    eigh = torch.linalg.eigh

    def counted(*args, **kwargs):
        calls.append(1)
        return eigh(*args, **kwargs)
    torch.linalg.eigh = counted
    try:
        return fn(), len(calls)
    finally:
        torch.linalg.eigh = eigh


def main(out: Path) -> None:
    torch.set_num_threads(1)
    with DistContext.from_env() as ctx:
        influence, train, query = build_problem()
        target = influence.target
        n_train = train[0].shape[0]
        result = ik.stream_scores(influence, query, train, k=4, store=out / "store",
                                  block_size=5, store_dtype="float64", context=ctx,
                                  runtime=ik.Runtime(progress=False))
        # all-reduced sums and counts: the gradient of the mean loss, as a sharded fit needs it
        shard = ctx.shard(n_train)
        grads = ik.grads.gradients(target, (train[0][shard.start:shard.stop],
                                            train[1][shard.start:shard.stop]),
                                   ik.Runtime(progress=False))
        total = grads.sum(dim=0)
        count = torch.tensor([len(shard)], dtype=torch.int64)
        ctx.all_reduce_sum_([total, count])
        # rows of different lengths from every rank, in rank order
        gathered = ctx.all_gather_rows(grads)
        # per-module eigendecompositions split across ranks, shared by broadcast
        full = gathered
        names = list(target.space.names)
        slices = target.space.slices()
        mine = ctx.for_modules(names, costs=[s.stop - s.start for s in slices.values()])
        owned = {}
        for name in mine:
            block = full[:, slices[name]]
            owned[name] = torch.linalg.eigvalsh(block.T @ block)
        eigenvalues = ctx.broadcast_from_owners(owned, ctx.module_owners(
            names, costs=[s.stop - s.start for s in slices.values()]))
        # a bfloat16 tensor from the last rank arrives bit for bit
        bf16 = ctx.broadcast(torch.arange(7, dtype=torch.float32).div(3).to(torch.bfloat16)
                             if ctx.rank == ctx.world_size - 1 else None, ctx.world_size - 1)
        # another run's store is refused on every rank (rank 0 opens it, the others learn why)
        other, _, _ = build_problem(damping=0.1)
        try:
            ik.stream_scores(other, query, train, k=4, store=out / "store", block_size=5,
                             store_dtype="float64", context=ctx,
                             runtime=ik.Runtime(progress=False))
            refused = 0
        except StoreError:
            refused = 1
        # sharded curvature, fits, scores and gradients (Runtime.context), and fit stores
        runtime = ik.Runtime(batch_size=5, progress=False, context=ctx)
        fits = sharded_fits(runtime)
        stored = sharded_fits(runtime, store=out / "fitstore")
        target, kfac_train, _, _ = build_kfac_problem()
        _, eigh_calls = count_eigh(lambda: ik.KFAC(damping=1e-2).fit(
            ik.Curvature(target, kfac_train), runtime))
        top = result.top_k
        tensors = {
            "refused": torch.tensor([refused]),
            "helpful_scores": top.helpful_scores, "helpful_indices": top.helpful_indices,
            "harmful_scores": top.harmful_scores, "harmful_indices": top.harmful_indices,
            "grad_sum": total, "count": count, "gathered": gathered, "bf16": bf16,
            "n_train_scored": torch.tensor([result.n_train_scored]),
            "blocks_computed": torch.tensor([result.blocks_computed]),
            "world_size": torch.tensor([ctx.world_size]),
            "owned": torch.tensor([len(mine)]),
            **{f"eig/{n}": v for n, v in eigenvalues.items()},
            **{f"fits/{k}": v for k, v in fits.items()},
            **{f"stored/{k}": v for k, v in stored.items()},
            "eigh_calls": torch.tensor([eigh_calls]),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(out / f"rank{ctx.rank}.safetensors"))
        ctx.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
