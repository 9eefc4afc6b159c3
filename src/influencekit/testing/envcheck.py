"""Check that optional installs left a CPU-only torch stack where transformers imports.

A package that depends on torchvision can pull a CUDA torchvision (and ``nvidia-*`` wheels) next
to the CPU torch; transformers' BERT classes then fail to import (``operator torchvision::nms does
not exist``). ``python -m influencekit.testing.envcheck`` (run by ``make bench-deps`` and ``make
data-lm``) exits 1 naming the culprit, else prints one line and exits 0.
"""

from __future__ import annotations

import importlib.metadata
import sys

#: transformers classes the language-model benchmarks and demos import.
MODEL_CLASSES = ("BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM")


def cuda_distributions(installed: dict[str, str] | None = None) -> list[str]:
    """CUDA builds among ``installed`` (``{distribution name: version}``, default this
    environment's): ``nvidia-*`` and ``triton`` wheels, and a torchvision that is not a CPU build
    (no ``+cpu``) while torch is one."""
    if installed is None:
        installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    lower = {name.lower(): version for name, version in installed.items()}
    found = sorted(n for n in lower if n.startswith("nvidia-") or n == "triton")
    torch_v, vision_v = lower.get("torch", ""), lower.get("torchvision")
    if vision_v is not None and "+cpu" in torch_v and "+cpu" not in vision_v:
        found.append(f"torchvision {vision_v} (torch is {torch_v})")
    return found


def import_errors() -> dict[str, str]:
    """``{class name: error}`` for the transformers model classes that fail to import
    (empty when transformers is absent: nothing to break)."""
    try:
        import transformers
    except ImportError:
        return {}
    errors = {}
    for name in MODEL_CLASSES:
        try:
            getattr(transformers, name)
        except Exception as exc:  # transformers raises RuntimeError from its lazy imports
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    return errors


def main() -> int:
    problems = [f"CUDA package installed: {name}" for name in cuda_distributions()]
    problems += [f"transformers.{name} does not import: {err}"
                 for name, err in import_errors().items()]
    if problems:
        print("envcheck FAILED:\n  " + "\n  ".join(problems) + "\nFix: uninstall them "
              "(pip uninstall torchvision ...) and install packages that depend on torchvision "
              "with --no-deps (see the Makefile's bench-deps).", file=sys.stderr)
        return 1
    print("envcheck: CPU-only torch stack; transformers' model classes import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
