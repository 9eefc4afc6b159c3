"""The kronfluence adapter of benchmarks/language_models.py compares the same function: its
Linear copy of a GPT-2 (whose Conv1D layers kronfluence cannot track) gives the same logits, under
the same module names, and leaves the original model untouched."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from .transformer_models import lm_data, tiny_gpt2

ADAPTER = Path(__file__).resolve().parents[1] / "benchmarks" / "_kronfluence.py"


def _adapter():
    spec = importlib.util.spec_from_file_location("bench_kronfluence_adapter", ADAPTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_copy_of_gpt2_is_the_same_function_under_the_same_names():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = _adapter().linear_copy(model)
    conv = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    linear = {n for n, m in copy.named_modules() if isinstance(m, nn.Linear)}
    assert conv and conv <= linear
    assert not any(type(m).__name__ == "Conv1D" for m in copy.modules())
    batch = lm_data(3, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(copy(**batch).logits, model(**batch).logits, rtol=0,
                                   atol=1e-12)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
