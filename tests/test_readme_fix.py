"""The README's "Fixing a wrong prediction" block runs as written on a tiny 2-layer BERT (its
layers 4 and 5 read as the tiny model's 0 and 1), and what it reports agrees with plain forward
passes of the model it rewrote in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import influencekit as ik

from . import transformer_models as tm

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def fix_block() -> str:
    start = README.index("## Fixing a wrong prediction")
    block = README[start:].split("```python\n", 1)[1].split("```", 1)[0]
    assert "fix_prediction" in block and "selection_matrix" in block
    return block.replace("layer.4.", "layer.0.").replace("layer.5.", "layer.1.")


def plain_predictions(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.argmax(-1)


def test_the_fix_block_runs_and_agrees_with_plain_forward_passes():
    model = tm.tiny_bert()
    train = tm.classification_data(40, seed=1)
    heldout = tm.classification_data(30, seed=2)
    pool = tm.classification_data(30, seed=3)
    wrong_rows = (plain_predictions(model, pool) != pool["labels"]).nonzero()[:, 0][:4]
    assert len(wrong_rows) >= 2
    wrong = {k: v[wrong_rows] for k, v in pool.items()}
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    namespace = {"ik": ik, "torch": torch, "model": model, "train": train,
                 "heldout": heldout, "wrong": wrong, "print": lambda *a: None}
    exec(fix_block(), namespace)
    fix, scores, layers = namespace["fix"], namespace["scores"], namespace["layers"]

    assert layers == ["bert.encoder.layer.0.attention.self.query",
                      "bert.encoder.layer.0.attention.self.key",
                      "bert.encoder.layer.0.attention.self.value",
                      "bert.encoder.layer.0.attention.output.dense",
                      "bert.encoder.layer.0.intermediate.dense",
                      "bert.encoder.layer.0.output.dense",
                      "bert.encoder.layer.1.attention.self.query",
                      "bert.encoder.layer.1.attention.self.key",
                      "bert.encoder.layer.1.attention.self.value",
                      "bert.encoder.layer.1.attention.output.dense",
                      "bert.encoder.layer.1.intermediate.dense",
                      "bert.encoder.layer.1.output.dense",
                      "bert.pooler.dense", "classifier"]
    assert scores.shape == (len(wrong_rows), 40)
    # the 32 examples fine-tuned on are the 32 best-scored (plain sort)
    assert sorted(fix.indices) == sorted(torch.argsort(scores[0], descending=True)[:32].tolist())
    # in_place=True: the model now predicts what the result says, by a plain forward pass
    query = {k: v[:1] for k, v in wrong.items()}
    assert int(plain_predictions(model, query)[0]) == fix.prediction_after
    assert fix.fixed == (fix.prediction_after == int(wrong["labels"][0]))
    assert fix.prediction_before != int(wrong["labels"][0])
    # held-out accuracy before (untouched model) and after (rewritten model), by plain loops
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p.detach(), before_params[n])]
    assert fix.steps >= 1 and changed
    assert all(n.rpartition(".")[0] in layers for n in changed)
    right_after = (plain_predictions(model, heldout) == heldout["labels"]).double().mean()
    assert fix.heldout_accuracy_after == pytest.approx(float(right_after), abs=1e-12)
    for n, p in model.named_parameters():
        p.data.copy_(before_params[n])
    right_before = (plain_predictions(model, heldout) == heldout["labels"]).double().mean()
    assert fix.heldout_accuracy_before == pytest.approx(float(right_before), abs=1e-12)
