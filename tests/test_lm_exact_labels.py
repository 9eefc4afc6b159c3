"""Exact labels for a causal language model's K-FAC / EK-FAC: every (position, token) pair.

The closed form: with exact labels, EK-FAC's corrected eigenvalues are the diagonal of the
layer's block of the exact GGN (from Jacobian products, no labels) in the Kronecker eigenbasis,
``Λ = diag((Q_S ⊗ Q_A)ᵀ C (Q_S ⊗ Q_A))``. Sampled labels only estimate it.
"""

import pytest
import torch
from torch import nn

import influencekit as ik
from influencekit.errors import InfluenceKitError

F64 = torch.float64
VOCAB, WIDTH, LENGTH = 5, 3, 4


class CausalMixer(nn.Module):
    """Embedding, a bias-free Linear + tanh per token, a causal running mean over positions
    (so a token's output gradient collects the losses of every later position), a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.lin = nn.Linear(WIDTH, 4, bias=False)
        self.head = nn.Linear(4, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.lin(self.emb(input_ids)))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.head(h.cumsum(dim=1) / steps)


def _problem():
    torch.manual_seed(0)
    model = CausalMixer().to(F64)
    ids = torch.randint(0, VOCAB, (3, LENGTH))
    labels = ids.clone()
    labels[1, 2:] = -100                       # a prompt / padding: positions not scored
    data = ik.grads.DictDataset({"input_ids": ids, "labels": labels})
    return ik.Target(model, ik.CausalLMTask(), params=["lin"]), data


def _diagonal_in_eigenbasis(fitted, dense):
    q = torch.kron(fitted.s_eigenvectors_[0], fitted.a_eigenvectors_[0])
    return torch.diagonal(q.T @ dense @ q).reshape(fitted.corrected_eigenvalues_[0].shape)


def test_exact_labels_give_the_ggn_diagonal_in_the_kronecker_eigenbasis():
    target, data = _problem()
    runtime = ik.Runtime(dtype=F64, batch_size=2)
    dense = ik.Curvature(target, data, kind="ggn").dense(runtime)
    fitted = ik.EKFAC(damping=1e-3, labels="exact").fit(ik.Curvature(target, data), runtime,
                                                        stationarity=False)
    assert fitted.fit_info_["labels"] == "exact"
    torch.testing.assert_close(fitted.corrected_eigenvalues_[0],
                               _diagonal_in_eigenbasis(fitted, dense), rtol=1e-10, atol=1e-13)
    # sampled labels only estimate it (the test can tell them apart)
    sampled = ik.EKFAC(damping=1e-3, labels="sampled").fit(ik.Curvature(target, data), runtime,
                                                           stationarity=False)
    want = _diagonal_in_eigenbasis(sampled, dense)
    assert (sampled.corrected_eigenvalues_[0] - want).norm() > 1e-3 * want.norm()


def test_auto_labels_stay_sampled_for_a_language_model():
    target, data = _problem()
    fitted = ik.KFAC(damping=1e-3).fit(ik.Curvature(target, data), ik.Runtime(dtype=F64),
                                       stationarity=False)
    assert fitted.fit_info_["labels"] == "sampled"


def test_exact_labels_refused_for_a_large_vocabulary():
    task = ik.CausalLMTask()
    logits = torch.zeros(1, 33, 49152)
    with pytest.raises(InfluenceKitError, match=r"32 x 49152.*labels='sampled'"):
        task.predictive_targets(logits, torch.zeros(1, 33, dtype=torch.long))
