"""How a text task turns its words into token ids: its own closed word vocabulary, or a pretrained model's
tokenizer (``tokenizer.json``, read with the ``tokenizers`` package).

An encoder gives the ids of the context (question + statements), the answer as (prefix, body) where the loss is on
predicting the body (the answer tokens, then end-of-sequence), the padding id and the vocabulary, and ``count``: the
tokens one more statement adds to a context (exact for the word vocabulary, an estimate for a BPE tokenizer, whose
counts are not always additive: callers that need an exact length encode the context). Scoring stays
exact match of the body under teacher forcing, which is what greedy decoding produces token for token, so an
answer counts as right exactly when its decoded number (or variable list) is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Special tokens looked up in a pretrained tokenizer, most common spellings first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|im_end|>")
PAD_NAMES = ("<|endoftext|>", "<pad>", "[PAD]", "</s>")
BOS_NAMES = ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>")


class WordEncoder:
    """The task's own vocabulary: ``tokenize`` splits text into words that are all in ``vocab``."""

    def __init__(self, vocab: Sequence[str], tokenize):
        self.vocab = tuple(vocab)
        self._ids = {t: i for i, t in enumerate(self.vocab)}
        self._tokenize = tokenize
        self.pad_id = self._ids["PAD"]

    def ids(self, words: Sequence[str]) -> np.ndarray:
        return np.asarray([self._ids[w] for w in words], dtype=np.int32)

    def context(self, question: str, text: str) -> np.ndarray:
        return self.ids(["BOS"] + self._tokenize(question) + self._tokenize(text))

    def count(self, statement: str) -> int:
        """Tokens ``statement`` adds to a context (exact: words never span the space between statements)."""
        return len(self._tokenize(statement))

    def answer(self, answer_tokens: Sequence[str], answer_text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.ids(["Answer", ":"]), self.ids(list(answer_tokens) + ["EOS"])


class TokenizerEncoder:
    """A pretrained model's tokenizer. The context is ``question + " " + statements`` (after BOS if the tokenizer
    has one); the answer is `` Answer:`` then `` <answer>`` and EOS."""

    def __init__(self, path: str):
        from pathlib import Path

        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.exists():
            raise ValueError(f"tokenizer must be a tokenizer.json file or a directory holding one, got {path!r}")
        self._tok = Tokenizer.from_file(str(file))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        names = [""] * size
        for token, i in vocab.items():
            names[i] = token
        self.vocab = tuple(names)
        self.eos_id = self._special(EOS_NAMES, "end-of-sequence")
        self.pad_id = self._special(PAD_NAMES, "padding")
        self.bos_id = next((vocab[n] for n in BOS_NAMES if n in vocab), None)

    def _special(self, names, what) -> int:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        raise ValueError(f"the tokenizer has no {what} token (looked for {names})")

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def context(self, question: str, text: str) -> np.ndarray:
        bos = [] if self.bos_id is None else [self.bos_id]
        return np.asarray(bos + self._encode(question + " " + text), dtype=np.int32)

    def count(self, statement: str) -> int:
        """Tokens ``statement`` adds to a context after a space (an estimate: a merge may span the boundary)."""
        return len(self._encode(" " + statement))

    def answer(self, answer_tokens: Sequence[str], answer_text: str) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self._encode(" Answer:"), np.int32),
                np.asarray(self._encode(" " + answer_text) + [self.eos_id], np.int32))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])
