"""K-FAC statistics of embeddings and norms against their dense definitions (one-hot matrices,
per-example outer products) on small random batches."""

import torch
from torch import nn

from influencekit.curvature import kfac_kinds

F64 = torch.float64


def test_embedding_factor_is_the_diagonal_of_the_one_hot_covariance():
    gen = torch.Generator().manual_seed(0)
    module = nn.Embedding(6, 3, padding_idx=0)
    x = torch.randint(0, 6, (4, 5), generator=gen)
    mask = torch.rand(4, 5, generator=gen) > 0.3
    ids = kfac_kinds.embedding_ids(module, x, mask)
    w = torch.rand(4, dtype=F64, generator=gen) + 0.5
    real = (ids >= 0).to(F64)
    counts = real.sum(1).clamp_min(1)
    one_hot = torch.nn.functional.one_hot(x, 6).to(F64) * real[..., None]
    dense = torch.einsum("b,bti,btj->ij", w / counts, one_hot, one_hot)
    got = kfac_kinds.embedding_factor_sum(ids, w, counts, 6)
    torch.testing.assert_close(torch.diag(got), dense)                   # dense is diagonal


def test_embedding_correction_equals_squared_per_example_gradient_columns():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 7, (3, 6), generator=gen)
    rotated = torch.randn(3, 6, 4, dtype=F64, generator=gen)
    coef = torch.rand(3, dtype=F64, generator=gen)
    one_hot = torch.nn.functional.one_hot(ids.clamp_min(0), 7).to(F64) * (ids >= 0)[..., None]
    per_example = torch.einsum("bto,btv->bov", rotated, one_hot)         # Q_Sᵀ G_b  [B, d, V]
    expected = torch.einsum("b,bov->ov", coef, per_example ** 2)
    torch.testing.assert_close(kfac_kinds.embedding_correction_sum(ids, rotated, coef, 7),
                               expected)


def test_norm_block_is_the_weighted_outer_product_of_per_example_gradients():
    from influencekit.grads import Layer

    gen = torch.Generator().manual_seed(2)
    layer = Layer("ln", "layernorm", "ln.weight", "ln.bias", 3, 3)
    xhat, delta = (torch.randn(4, 5, 3, dtype=F64, generator=gen) for _ in range(2))
    g = kfac_kinds.norm_gradients(layer, xhat, delta)
    loop = torch.stack([torch.cat([(delta[b] * xhat[b]).sum(0), delta[b].sum(0)])
                        for b in range(4)])
    torch.testing.assert_close(g, loop)
    coef = torch.rand(4, dtype=F64, generator=gen)
    block = kfac_kinds.norm_block_sum(g, coef, diagonal=False)
    expected = sum(c * torch.outer(r, r) for c, r in zip(coef, loop, strict=True))
    torch.testing.assert_close(block, expected)
    torch.testing.assert_close(kfac_kinds.norm_block_sum(g, coef, diagonal=True),
                               torch.diagonal(block))
