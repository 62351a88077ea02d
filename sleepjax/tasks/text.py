"""Your own data: a JSONL file of prompt/answer records, or plain text, tokenized with a checkpoint's tokenizer.

Formats (``format="auto"`` picks by extension: ``.jsonl`` / ``.json`` -> jsonl, anything else -> text):

* ``jsonl``: one JSON object per line, ``{"prompt": ..., "answer": ...}`` (``prompt_field`` / ``answer_field``
  name other keys; ``difficulty_field`` an optional integer key >= 0 that evaluation groups by, else 0). Blank lines
  are skipped. Each record is one example: ``[BOS] prompt answer EOS PAD...`` from position 0, with the loss only
  on the predictions of the answer's tokens and of EOS (one scored item: exact = the whole answer right under
  teacher forcing). The prompt and the answer are tokenized apart: the answer as ``separator + answer`` (default
  one space; ``separator=""`` when the prompt ends with its own separator).
  ``chat_template=True`` renders the record as a ChatML conversation (the format of Qwen's chat templates),
  ``<|im_start|>system\\n{system}<|im_end|>\\n`` (only with ``system``), ``<|im_start|>user\\n{prompt}<|im_end|>\\n``
  ``<|im_start|>assistant\\n`` then the supervised ``{answer}<|im_end|>``; no BOS, no separator, no thinking
  block. It needs a tokenizer whose checkpoint has a ChatML chat template (``chat_template.jinja`` or
  tokenizer_config.json's ``chat_template``): any other template is refused (sleepjax renders no Jinja).
* ``text``: documents, one per line (``text_split="line"``) or separated by blank lines (``"blank"``; ``"auto"``:
  blank when the file has a blank line between two non-blank ones). Each document is ``[BOS] text EOS``, with
  the loss on every prediction (a language model), cut into examples of ``context_len`` tokens: example k starts
  at token k * (context_len - 1 - loss_from), so every token after the first ``loss_from + 1`` of a document is
  predicted in exactly one example. ``loss_from`` > 0 supervises only the predictions made at positions >=
  loss_from of each example: with loss_from = k * window the first k windows hold no supervised position and are
  consolidated with N passes (sleep) before the rest is predicted from the fast weights. A document too short
  for one supervised prediction is dropped (counted in ``dropped``). Its one item is every supervised position
  (exact is rarely 1: read ``loss`` and ``token_accuracy``), difficulty 0.

Tokens: ``tokenizer`` (a checkpoint directory or a tokenizer.json; the launchers pass ``train.init_from``), read
with ``sleepjax.pretrained.load_tokenizer``; BOS, EOS and PAD are tokenizer_config.json's ``bos_token`` /
``eos_token`` / ``pad_token`` when it names them, else the usual spellings (``text_encoding.py``; no BOS for Qwen).
Without a tokenizer the text is UTF-8 bytes (ids 3..258; 0 PAD, 1 BOS, 2 EOS): a model trained from scratch.

Length: every example is ``context_len`` tokens (the sequence length), right-padded with PAD (never supervised).
A jsonl record longer than that (prompt + answer + EOS) is an error naming its file and line
(``too_long="error"``) or is dropped (``"drop"``: the count is printed and kept in ``dropped``).

Splits: ``train_path``, and ``eval_path`` or else a held-out ``eval_fraction`` of the train file's records
(documents for text), chosen by a fixed permutation that depends on the file's size only (not on the seed, so
every run of a sweep holds out the same records). Train example i is record ``order(seed, i // n)[i % n]`` of
the n train records (each pass over them in its own order, a pure function of (seed, pass)); test example i is
eval record i (seed ignored); asking for more than there are is an error naming the split's size, so
``train.eval_size`` must be at most that (as for GSM-Infinite's published rows).

Sleep schedule: computed from the data. Every example's supervised positions are known when the files are read,
so window w is S when no example (train or eval) is supervised there, W when every example is, M otherwise:
correct for any batch under any window size, eviction or sleep_layers, and as tight as the data allow.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sleepjax import schedule as schedule_lib
from sleepjax.tasks.base import Example, Task, example_rng
from sleepjax.tasks.text_encoding import BOS_NAMES, EOS_NAMES, PAD_NAMES

FORMATS = ("auto", "jsonl", "text")
TEXT_SPLITS = ("auto", "line", "blank")
TOO_LONG = ("error", "drop")
JSONL_SUFFIXES = (".jsonl", ".json")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BYTE_SPECIALS = ("PAD", "BOS", "EOS")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _Bytes:
    """UTF-8 bytes as tokens: 0 PAD, 1 BOS, 2 EOS, byte b -> 3 + b."""

    def __init__(self):
        self.vocab = BYTE_SPECIALS + tuple(f"<0x{b:02X}>" for b in range(256))
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[3 + b for b in text.encode("utf-8")] for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return None


class _Pretrained:
    """A checkpoint's tokenizer.json, with its special tokens and chat template from the files beside it."""

    def __init__(self, path: str):
        from sleepjax import pretrained

        self._tok = pretrained.load_tokenizer(path)
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        ids = self._tok.get_vocab(with_added_tokens=True)
        names = [""] * (max(ids.values()) + 1)
        for token, i in ids.items():
            names[i] = token
        self.vocab = tuple(names)

        def special(key: str, spellings: Sequence[str], what: str | None):
            """tokenizer_config's ``key`` when it names one (None: it says there is none), else a usual spelling."""
            if key in config:
                name = config[key]["content"] if isinstance(config[key], dict) else config[key]
                if name is None:
                    return None
                if self._tok.token_to_id(name) is None:
                    raise ValueError(f"{config_file}: {key} {name!r} is not a token of {path}")
                return self._tok.token_to_id(name)
            found = next((self._tok.token_to_id(n) for n in spellings if self._tok.token_to_id(n) is not None), None)
            if found is None and what:
                raise ValueError(f"the tokenizer {path!r} has no {what} token (looked for {tuple(spellings)})")
            return found

        self.bos_id = special("bos_token", BOS_NAMES, None)
        self.eos_id = special("eos_token", EOS_NAMES, "end-of-sequence")
        pad = special("pad_token", PAD_NAMES, None)
        self.pad_id = self.eos_id if pad is None else pad
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) else None

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class Text(Task):
    """Prompt/answer records (JSONL) or plain text from local files; see the module docstring.

    Options: train_path (required), eval_path (None: hold out eval_fraction of train_path), eval_fraction, format,
    prompt_field, answer_field, difficulty_field, separator, chat_template, system, text_split, loss_from,
    tokenizer (None: UTF-8 bytes), context_len (the sequence length), window (the model's window unless
    config.model.window says otherwise), too_long.
    """

    name = "text"

    def __init__(self, *, train_path: str | None = None, eval_path: str | None = None, eval_fraction: float = 0.1,
                 format: str = "auto", prompt_field: str = "prompt", answer_field: str = "answer",
                 difficulty_field: str | None = None, separator: str = " ", chat_template: bool = False,
                 system: str | None = None, text_split: str = "auto", loss_from: int = 0,
                 tokenizer: str | None = None, context_len: int = 128, window: int = 64, too_long: str = "error"):
        options = dict(train_path=None if train_path is None else str(train_path),
                       eval_path=None if eval_path is None else str(eval_path), eval_fraction=eval_fraction,
                       format=format, prompt_field=prompt_field, answer_field=answer_field,
                       difficulty_field=difficulty_field, separator=separator, chat_template=chat_template,
                       system=system, text_split=text_split, loss_from=loss_from,
                       tokenizer=None if tokenizer is None else str(tokenizer), context_len=context_len,
                       window=window, too_long=too_long)
        self._validate(options)
        self.options = options
        for key, value in options.items():
            setattr(self, key, value)
        self.format = self._format_of(self.train_path) if format == "auto" else format
        if self.eval_path is not None and self._format_of(self.eval_path) != self.format and format == "auto":
            raise ValueError(f"train_path {self.train_path!r} and eval_path {self.eval_path!r} have different formats "
                             f"(by extension); give format='jsonl' or 'text'")
        if self.format == "text" and (chat_template or system is not None):
            raise ValueError("chat_template and system apply to jsonl prompt/answer records, not to plain text")
        if self.format == "jsonl" and loss_from:
            raise ValueError("loss_from applies to plain text; a jsonl record's loss is its answer")
        self._tok = _Pretrained(self.tokenizer) if self.tokenizer else _Bytes()
        if chat_template:
            self._check_chat_template()
        self.vocab = self._tok.vocab
        self.seq_len = self.context_len
        self.num_items = 1
        self.dropped: dict[str, int] = {"train": 0, "test": 0}
        train = self._read(self.train_path, "train")
        if self.eval_path is None:
            held = self._held_out(len(train))
            evals = [train[i] for i in sorted(held)]
            train = [r for i, r in enumerate(train) if i not in held]
        else:
            evals = self._read(self.eval_path, "test")
        self._items = {"train": self._examples(train, "train"), "test": self._examples(evals, "test")}
        for split, items in self._items.items():
            if not items:
                raise ValueError(f"the {split} split holds no example (train_path={self.train_path!r}, eval_path="
                                 f"{self.eval_path!r}, eval_fraction={self.eval_fraction}, dropped "
                                 f"{self.dropped[split]})")
        if any(self.dropped.values()):
            what = (f"records longer than context_len={self.context_len} tokens" if self.format == "jsonl" else
                    f"documents too short for a supervised prediction (loss_from={self.loss_from})")
            print(f"text: dropped {self.dropped['train']} train and {self.dropped['test']} eval {what}", flush=True)
        self._spans = np.asarray([(e["lo"], e["hi"]) for items in self._items.values() for e in items], np.int64)

    # --- options

    @staticmethod
    def _validate(o: dict) -> None:
        if not o["train_path"]:
            raise ValueError("train_path is required: --config.task.train_path=FILE (.jsonl prompt/answer records, "
                             "or plain text)")
        for key in ("train_path", "eval_path"):
            if o[key] is not None and not Path(o[key]).is_file():
                raise ValueError(f"{key} {o[key]!r} is not a file")
        if o["tokenizer"] is not None and not Path(o["tokenizer"]).exists():
            raise ValueError(f"tokenizer {o['tokenizer']!r} does not exist (a checkpoint directory or a "
                             f"tokenizer.json)")
        choices = {"format": FORMATS, "text_split": TEXT_SPLITS, "too_long": TOO_LONG}
        for key, allowed in choices.items():
            if o[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {o[key]!r}")
        for key in ("context_len", "window"):
            if not _is_int(o[key]) or o[key] < 2:
                raise ValueError(f"{key} must be an int >= 2, got {o[key]!r}")
        if not _is_int(o["loss_from"]) or not 0 <= o["loss_from"] <= o["context_len"] - 2:
            raise ValueError(f"loss_from must be an int in [0, context_len - 2 = {o['context_len'] - 2}], got "
                             f"{o['loss_from']!r}")
        fraction = o["eval_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"eval_fraction must be a number in (0, 1) (the held-out share of train_path when there "
                             f"is no eval_path), got {fraction!r}")
        for key in ("prompt_field", "answer_field"):
            if not isinstance(o[key], str) or not o[key]:
                raise ValueError(f"{key} must be a non-empty string, got {o[key]!r}")
        for key in ("difficulty_field", "system"):
            if o[key] is not None and not isinstance(o[key], str):
                raise ValueError(f"{key} must be None or a string, got {o[key]!r}")
        if not isinstance(o["separator"], str):
            raise ValueError(f"separator must be a string, got {o['separator']!r}")
        if not isinstance(o["chat_template"], bool):
            raise ValueError(f"chat_template must be a bool, got {o['chat_template']!r}")

    @staticmethod
    def _format_of(path: str) -> str:
        return "jsonl" if Path(path).suffix.lower() in JSONL_SUFFIXES else "text"

    def _check_chat_template(self) -> None:
        template = getattr(self._tok, "chat_template", None)
        if template is None:
            raise ValueError(f"chat_template=True needs a checkpoint with a chat template (chat_template.jinja or "
                             f"tokenizer_config.json's chat_template); tokenizer={self.tokenizer!r} has none")
        if IM_START not in template or IM_END not in template:
            raise ValueError(f"chat_template=True renders ChatML (<|im_start|>role ... <|im_end|>) only; the chat "
                             f"template of {self.tokenizer!r} is another format")
        for token in (IM_START, IM_END):
            if self._tok.token_id(token) is None:
                raise ValueError(f"the tokenizer {self.tokenizer!r} has no {token} token for its ChatML template")

    # --- reading and tokenizing

    def _read(self, path: str, split: str) -> list[dict]:
        """The file's records (jsonl) or documents (text): dicts with the text, where it came from and difficulty."""
        text = Path(path).read_text(encoding="utf-8")
        if self.format == "text":
            lines = text.splitlines()
            mode = self.text_split
            if mode == "auto":
                stripped = [bool(line.strip()) for line in lines]
                first = stripped.index(True) if any(stripped) else 0
                last = len(stripped) - stripped[::-1].index(True) if any(stripped) else 0
                mode = "blank" if not all(stripped[first:last]) else "line"
            docs, start, current = [], 0, []
            for number, line in enumerate(lines, 1):
                if mode == "line":
                    if line.strip():
                        docs.append({"text": line, "where": f"{path}:{number}"})
                elif line.strip():
                    if not current:
                        start = number
                    current.append(line)
                elif current:
                    docs.append({"text": "\n".join(current), "where": f"{path}:{start}"})
                    current = []
            if current:
                docs.append({"text": "\n".join(current), "where": f"{path}:{start}"})
            if not docs:
                raise ValueError(f"{path} holds no document")
            return docs
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
            fields = {}
            for key in (self.prompt_field, self.answer_field):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{where}: field {key!r} must be a string (keys: {sorted(row)}); the fields are "
                                     f"set by prompt_field / answer_field")
                fields[key] = row[key]
            if not fields[self.answer_field].strip():
                raise ValueError(f"{where}: the answer ({self.answer_field!r}) is empty")
            difficulty = 0
            if self.difficulty_field is not None:
                difficulty = row.get(self.difficulty_field)
                if not _is_int(difficulty) or difficulty < 0:
                    raise ValueError(f"{where}: field {self.difficulty_field!r} (difficulty_field) must be an int >= "
                                     f"0, got {difficulty!r}")
            records.append({"prompt": fields[self.prompt_field], "answer": fields[self.answer_field],
                            "difficulty": int(difficulty), "where": where})
        if not records:
            raise ValueError(f"{path} holds no record")
        return records

    def _held_out(self, n: int) -> set[int]:
        """Indices of the records held out for evaluation: a fixed share, by a permutation of n alone."""
        if n < 2:
            raise ValueError(f"train_path {self.train_path!r} holds {n} record(s): give eval_path, or at least 2 "
                             f"records to hold some out")
        count = min(n - 1, max(1, round(self.eval_fraction * n)))
        order = example_rng(0, n, "test", salt="text_holdout").permutation(n)
        return set(int(i) for i in order[:count])

    def _prompt_text(self, prompt: str) -> str:
        if not self.chat_template:
            return prompt
        system = f"{IM_START}system\n{self.system}{IM_END}\n" if self.system is not None else ""
        return f"{system}{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"

    def _examples(self, rows: list[dict], split: str) -> list[dict]:
        """Each row's example(s): token ids (unpadded), the supervised span [lo, hi) of positions, meta."""
        tok, out = self._tok, []
        bos = [] if tok.bos_id is None or self.chat_template else [tok.bos_id]
        if self.format == "text":
            stride = self.context_len - 1 - self.loss_from
            for doc, ids in zip(rows, tok.encode([r["text"] for r in rows])):
                ids = bos + ids + [tok.eos_id]
                chunks = 0
                for start in range(0, len(ids), stride):
                    piece = ids[start:start + self.context_len]
                    if len(piece) - 1 <= self.loss_from:  # no supervised prediction left
                        break
                    out.append({"ids": piece, "lo": self.loss_from, "hi": len(piece) - 1, "difficulty": 0,
                                "where": doc["where"], "chunk": chunks})
                    chunks += 1
                    if start + self.context_len >= len(ids):
                        break
                if not chunks:
                    self.dropped[split] += 1
            return out
        end = tok.token_id(IM_END) if self.chat_template else tok.eos_id
        prompts = tok.encode([self._prompt_text(r["prompt"]) for r in rows])
        answers = tok.encode([r["answer"] if self.chat_template else self.separator + r["answer"] for r in rows])
        for row, prompt, answer in zip(rows, prompts, answers):
            prompt, answer = bos + prompt, answer + [end]
            if not prompt:
                raise ValueError(f"{row['where']}: the prompt is empty and the tokenizer has no BOS: the first answer "
                                 f"token needs a position to be predicted from")
            length = len(prompt) + len(answer)
            if length > self.context_len:
                if self.too_long == "drop":
                    self.dropped[split] += 1
                    continue
                raise ValueError(f"{row['where']}: the record takes {length} tokens ({len(prompt)} prompt + "
                                 f"{len(answer)} answer with its end token), more than context_len="
                                 f"{self.context_len}: raise context_len or drop such records (too_long='drop')")
            out.append({"ids": prompt + answer, "lo": len(prompt) - 1, "hi": length - 1,
                        "difficulty": row["difficulty"], "where": row["where"], "prompt": row["prompt"],
                        "answer": row["answer"], "answer_start": len(prompt)})
        return out

    # --- the Task interface

    @property
    def sizes(self) -> dict[str, int]:
        """Examples per split (train examples cycle through theirs; the test split has exactly these)."""
        return {split: len(items) for split, items in self._items.items()}

    @functools.lru_cache(maxsize=4)
    def _order(self, seed: int, epoch: int) -> np.ndarray:
        n = len(self._items["train"])
        return example_rng(seed, epoch, "train", salt=f"text_order|{n}").permutation(n)

    def item(self, seed: int, index: int, split: str = "train") -> dict:
        """The tokenized record (or document chunk) behind ``example(seed, index, split)``."""
        example_rng(seed, index, split, salt="")  # the same checks of seed, index and split as every task's
        items = self._items[split]
        if split == "test":
            if index >= len(items):
                raise ValueError(f"the eval split holds {len(items)} example(s), asked for example {index}: lower "
                                 f"train.eval_size to at most {len(items)}")
            return items[index]
        return items[int(self._order(int(seed), int(index) // len(items))[int(index) % len(items)])]

    def example(self, seed: int, index: int, split: str = "train") -> Example:
        item = self.item(seed, index, split)
        ids = item["ids"]
        tokens = np.full(self.seq_len, self._tok.pad_id, dtype=np.int32)
        tokens[:len(ids)] = ids
        loss_mask = np.zeros(self.seq_len, dtype=bool)
        loss_mask[item["lo"]:item["hi"]] = True
        positions = np.full(self.seq_len, -1, dtype=np.int32)
        positions[item["lo"]:item["hi"]] = 0
        meta = {k: v for k, v in item.items() if k not in ("ids", "lo", "hi", "difficulty")}
        return Example(tokens=tokens, loss_mask=loss_mask,
                       meta=dict(item=positions, difficulty=np.array([item["difficulty"]], np.int32),
                                 num_tokens=len(ids), **meta))

    def sleep_schedule(self, window: int | None = None) -> str:
        """S / W / M per window from every example's supervised span (train and eval; see the module docstring)."""
        window = self.window if window is None else int(window)
        count = schedule_lib.num_windows(self.seq_len, window)
        lo, hi = self._spans[:, 0], self._spans[:, 1]
        letters = []
        for w in range(count):
            covered = (lo < (w + 1) * window) & (hi > w * window)
            letters.append(schedule_lib.WAKE if covered.all() else schedule_lib.SLEEP if not covered.any()
                           else schedule_lib.MIXED)
        return "".join(letters)

    def prompt_ids(self, text: str) -> list[int]:
        """``text`` laid out as a training record's prompt (BOS, the chat template): what generation continues
        (``python -m experiments.generate --run_dir`` uses it)."""
        tok = self._tok
        bos = [] if tok.bos_id is None or self.chat_template else [tok.bos_id]
        return bos + tok.encode([self._prompt_text(text)])[0]

    @property
    def eos_id(self) -> int:
        """The token that ends an answer in training: <|im_end|> under the chat template, else the EOS."""
        return self._tok.token_id(IM_END) if self.chat_template else self._tok.eos_id

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of token ids (the tokenizer's decoding; bytes without a tokenizer)."""
        return self._tok.decode(tokens)
