"""The King James Bible from Debian's ``bible-kjv`` (program) and ``bible-kjv-text`` (text).

``bible gen1:1-rev22:21`` prints the whole text: a header line per chapter ("Genesis 1") after a
blank line, then numbered verses ("  1 In the beginning ...") wrapped over several lines. Nothing
is downloaded: when the program or its text is missing, :class:`DataUnavailableError` names the
install command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import DataUnavailableError

KJV_INSTALL = "apt-get install -y bible-kjv-text bible-kjv"
_VERSE = re.compile(r"^\s+(\d+)\s+(.*)$")


@dataclass(frozen=True)
class Verse:
    """One verse: ``reference`` like ``"Genesis 1:3"`` and its ``text`` (one line)."""

    reference: str
    text: str


def kjv_available() -> bool:
    """True when the ``bible`` program and its text are installed."""
    try:
        kjv_text("gen1:1-gen1:1")
    except DataUnavailableError:
        return False
    return True


def kjv_text(passage: str = "gen1:1-rev22:21") -> str:
    """The raw output of ``bible <passage>`` (the whole book by default, 4.3 MB)."""
    program = shutil.which("bible")
    if program is None:
        raise DataUnavailableError(
            f"the King James Bible is not installed (no `bible` program). Fix: `{KJV_INSTALL}` "
            "(Debian packages, 2.6 MB; `make data-lm` runs it).")
    done = subprocess.run([program, passage], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise DataUnavailableError(
            f"`bible {passage}` printed no text ({done.stderr.strip()[:200] or 'no output'}): "
            f"the text package may be missing. Fix: `{KJV_INSTALL}`.")
    return done.stdout


@lru_cache(maxsize=4)
def kjv_verses(passage: str = "gen1:1-rev22:21") -> tuple[Verse, ...]:
    """Every verse of ``passage`` in order (31,102 for the whole book), wrapped lines joined."""
    verses: list[Verse] = []
    chapter, number, parts = "", None, []

    def close():
        if number is not None:
            verses.append(Verse(f"{chapter}:{number}", " ".join(parts)))

    for line in kjv_text(passage).splitlines():
        match = _VERSE.match(line)
        if match:
            close()
            number, parts = match.group(1), [match.group(2).strip()]
        elif not line.strip():
            continue
        elif line[0].isspace() or number is None or _is_header(line):
            close()
            chapter, number, parts = line.strip(), None, []
        else:
            parts.append(line.strip())
    close()
    return tuple(verses)


def _is_header(line: str) -> bool:
    """A chapter header ("Genesis 1", "1 Kings 3", "Song of Solomon 2") ends in a number and has
    no sentence punctuation."""
    return bool(re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", line.strip()))


class CharTokenizer:
    """A character-level tokenizer over a fixed alphabet (the KJV's lower-case characters).

    Token 0 is padding (and any character outside the alphabet); character ``alphabet[i]`` is
    token ``i + 1``. ``lower`` maps text to lower case first.
    """

    DEFAULT_ALPHABET = " abcdefghijklmnopqrstuvwxyz,.;:?!'()-"

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, lower: bool = True):
        self.alphabet = alphabet
        self.lower = lower

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def encode(self, text: str) -> list[int]:
        text = text.lower() if self.lower else text
        index = {c: i + 1 for i, c in enumerate(self.alphabet)}
        return [index.get(c, 0) for c in text]

    def decode_tokens(self, ids) -> list[str]:
        """One string per token (``""`` for padding)."""
        return ["" if int(i) == 0 else self.alphabet[int(i) - 1] for i in ids]

    def batch(self, texts: list[str], length: int) -> dict[str, torch.Tensor]:
        """``{"input_ids": [n, length], "attention_mask": [n, length]}``: each text cut to
        ``length`` characters and right-padded with 0 (mask 0 on padding)."""
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.encode(text)[:length]
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}
