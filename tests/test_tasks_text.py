"""The text task (your own data): JSONL prompt/answer records and plain text from the files in
tests/fixtures/text_task/, tokenized with the tiny checkpoint's tokenizer (or UTF-8 bytes); masks, splits,
determinism, the chat template, length rules and the data-derived sleep schedule."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from sleepjax import schedule as schedule_lib
from sleepjax import tasks
from sleepjax.tasks import check_example, stack

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "text_task"
QA, QA_EVAL, DOCS, LINES = DATA / "qa.jsonl", DATA / "qa_eval.jsonl", DATA / "docs.txt", DATA / "lines.txt"
TOKENIZER = FIXTURES / "qwen3"
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qa(**options):
    return tasks.get("text", **{**dict(train_path=QA, eval_path=QA_EVAL, tokenizer=TOKENIZER, context_len=64,
                                       window=16, difficulty_field="level"), **options})


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def all_examples(task):
    return [task.example(0, i, split) for split in ("train", "test") for i in range(task.sizes[split])]


def test_jsonl_tokens_and_masks_match_an_independent_tokenization():
    """Catches a loss on the prompt or on padding, an off-by-one mask (the prediction of the first answer token is
    made at the prompt's last position), a missing EOS, and records paired with the wrong answer."""
    task = qa()
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    eos, pad = tok.token_to_id("[EOS]"), tok.token_to_id("[PAD]")
    expected = {}
    for row in records(QA) + records(QA_EVAL):
        prompt = tok.encode(row["prompt"], add_special_tokens=False).ids
        answer = tok.encode(" " + row["answer"], add_special_tokens=False).ids + [eos]
        expected[row["prompt"]] = (prompt, answer, row["level"])
    for ex in all_examples(task):
        check_example(task, ex)
        prompt, answer, level = expected[ex.meta["prompt"]]
        n = len(prompt) + len(answer)
        np.testing.assert_array_equal(ex.tokens[:n], prompt + answer)
        assert (ex.tokens[n:] == pad).all()
        supervised = np.flatnonzero(ex.loss_mask)
        np.testing.assert_array_equal(supervised, np.arange(len(prompt) - 1, n - 1))
        np.testing.assert_array_equal(ex.tokens[supervised + 1], answer)
        assert (ex.meta["item"][supervised] == 0).all() and (ex.meta["item"][~ex.loss_mask] == -1).all()
        assert ex.meta["difficulty"].tolist() == [level]
        assert task.decode(ex.tokens[supervised + 1]) == " " + ex.meta["answer"] + "[EOS]"


def test_field_names_separator_and_difficulty_default(tmp_path):
    """Catches field options that are ignored (the default keys read anyway) and a separator glued elsewhere."""
    path = tmp_path / "custom.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i} + 1? Answer:", "response": str(i + 1)})
                              for i in range(5)) + "\n\n")
    task = tasks.get("text", train_path=path, prompt_field="question", answer_field="response", separator="",
                     tokenizer=TOKENIZER, context_len=32, window=16, eval_fraction=0.2)
    assert task.sizes == {"train": 4, "test": 1}
    ex = task.example(0, 0)
    assert task.decode(ex.tokens[np.flatnonzero(ex.loss_mask) + 1]) == ex.meta["answer"] + "[EOS]"
    assert ex.meta["difficulty"].tolist() == [0]
    with pytest.raises(ValueError, match=r"custom.jsonl:1: field 'prompt' must be a string"):
        tasks.get("text", train_path=path, tokenizer=TOKENIZER)


@pytest.mark.parametrize("path,split,docs", [(DOCS, "blank", 3), (LINES, "line", 3)])
def test_plain_text_every_token_is_predicted_once(path, split, docs):
    """Catches chunks that skip or repeat tokens at their seams, documents split wrongly (lines vs paragraphs),
    and a loss on padding. UTF-8 bytes (no tokenizer) make the expected ids independent of any tokenizer."""
    for text_split in ("auto", split):
        task = tasks.get("text", train_path=path, eval_path=path, text_split=text_split, context_len=24, window=8)
        raw = Path(path).read_text()
        texts = ([p.strip() for p in raw.split("\n\n") if p.strip()] if split == "blank"
                 else [l for l in raw.splitlines() if l.strip()])
        assert len(texts) == docs
        predicted = {}
        for i in range(task.sizes["test"]):
            ex = task.example(0, i, "test")
            check_example(task, ex)
            supervised = np.flatnonzero(ex.loss_mask)
            assert supervised[0] == 0 and supervised[-1] == ex.meta["num_tokens"] - 2
            assert (ex.tokens[ex.meta["num_tokens"]:] == 0).all()
            predicted.setdefault(ex.meta["where"], []).extend(ex.tokens[supervised + 1].tolist())
        assert len(predicted) == docs
        for ids, text in zip(predicted.values(), texts):
            assert ids == [3 + b for b in text.encode()] + [2]  # every byte after BOS, then EOS, once and in order


def test_loss_from_makes_the_first_windows_sleep():
    """Catches loss_from ignored or off by one (a supervised position in window 0 would wake it in every example),
    and chunk strides that drop or repeat tokens when the first loss_from predictions are not scored."""
    task = tasks.get("text", train_path=DOCS, eval_path=DOCS, loss_from=8, context_len=24, window=8)
    assert task.sleep_schedule()[0] == schedule_lib.SLEEP and task.sleep_schedule(4)[:2] == "SS"
    doc = [1] + [3 + b for b in Path(DOCS).read_text().split("\n\n")[0].strip().encode()] + [2]
    predicted = []
    for i in range(task.sizes["test"]):
        ex = task.example(0, i, "test")
        if ex.meta["where"].endswith(":1"):
            assert not ex.loss_mask[:8].any() and ex.loss_mask[8]
            predicted += ex.tokens[np.flatnonzero(ex.loss_mask) + 1].tolist()
    assert predicted == doc[9:]


def test_held_out_split_is_fixed_disjoint_and_seed_independent():
    """Catches an eval set that overlaps training, or moves with the seed (a sweep over seeds would then be
    scored on different records)."""
    a = tasks.get("text", train_path=QA, tokenizer=TOKENIZER, context_len=64, window=16, eval_fraction=0.25)
    assert a.sizes == {"train": 9, "test": 3}
    held = {a.example(s, i, "test").meta["prompt"] for s in (0, 5) for i in range(3)}
    assert len(held) == 3
    train = {a.example(s, i).meta["prompt"] for s in (0, 1) for i in range(18)}
    assert train.isdisjoint(held) and len(train | held) == 12


def test_examples_are_a_pure_function_of_seed_index_split():
    """Catches hidden state (an iterator over the file) and an order that does not depend on the seed; each pass
    over the train records visits every record once."""
    a, b = qa(), qa()
    for split, index in (("train", 0), ("train", 17), ("test", 3)):
        x, y = a.example(7, index, split), b.example(7, index, split)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.loss_mask, y.loss_mask)
    n = a.sizes["train"]
    for epoch in range(2):
        seen = [a.example(3, epoch * n + i).meta["where"] for i in range(n)]
        assert len(set(seen)) == n
    orders = {tuple(a.example(seed, i).meta["where"] for i in range(n)) for seed in range(4)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match=r"eval split holds 4 example\(s\).*eval_size to at most 4"):
        a.example(0, 4, "test")


@pytest.mark.parametrize("window", [2, 3, 8, 16, 31, 64])  # 2, 3, 31: spans that end on a window edge
def test_declared_schedule_fits_every_example_and_is_tight(window):
    """Catches a schedule that says S or W where some example (train or eval) differs: the trainer would run it
    with M after a recompile and a warning, or, if it trusted it, sleep over a supervised window."""
    for task in (qa(), tasks.get("text", train_path=DOCS, eval_path=LINES, loss_from=8, context_len=24, window=8)):
        declared = task.sleep_schedule(window)
        masks = stack(all_examples(task))["loss_mask"]
        assert schedule_lib.fits(declared, masks, window)
        assert declared == schedule_lib.derive(masks, window)  # as tight as the data allow
    assert "M" in qa().sleep_schedule(16)  # answers fall in several windows


def test_too_long_records_are_an_error_or_dropped_and_counted(capsys):
    """Catches silent truncation (a cut answer or a lost EOS would be trained on) and a drop that is not said."""
    with pytest.raises(ValueError, match=r"qa.jsonl:7: the record takes \d+ tokens .* more than context_len=48"):
        qa(context_len=48)
    task = qa(context_len=48, too_long="drop")
    assert task.dropped == {"train": 2, "test": 0} and task.sizes["train"] == 10  # lines 7 and 10
    assert "dropped 2 train and 0 eval records longer than context_len=48 tokens" in capsys.readouterr().out
    assert max(int(e.meta["num_tokens"]) for e in all_examples(task)) <= 48


def _chatml_tokenizer(tmp_path, template=CHATML):
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "[PAD]"}))
    return tmp_path


def test_chat_template_renders_chatml_and_supervises_the_reply(tmp_path):
    """Catches a chat option that is ignored, a loss on the template's prompt part, a reply that does not end with
    the end-of-turn token, and a template sleepjax cannot render being used anyway."""
    ckpt = _chatml_tokenizer(tmp_path)
    task = qa(tokenizer=ckpt, chat_template=True, system="Be brief.", context_len=128)
    ex = task.example(0, 0, "test")
    n = ex.meta["num_tokens"]
    assert task.decode(ex.tokens[:n]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                          "What is 4 + 4?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>")
    assert task.decode(ex.tokens[np.flatnonzero(ex.loss_mask) + 1]) == "8<|im_end|>"
    check_example(task, ex)
    with pytest.raises(ValueError, match="has none"):
        qa(chat_template=True)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="ChatML"):
        qa(tokenizer=_chatml_tokenizer(other, "{{ bos_token }}[INST] {{ messages }} [/INST]"), chat_template=True)


def test_prompt_ids_and_eos_are_the_training_layout(tmp_path):
    """Catches generation prompts laid out differently from training (missing the chat template or BOS) or
    stopping at a token the answers never end with (experiments.generate --run_dir uses both)."""
    for task in (qa(), qa(tokenizer=_chatml_tokenizer(tmp_path), chat_template=True, context_len=128)):
        ex = task.example(0, 0, "test")
        first = int(np.flatnonzero(ex.loss_mask)[0])
        assert task.prompt_ids(ex.meta["prompt"]) == ex.tokens[:first + 1].tolist()
        assert ex.tokens[ex.meta["num_tokens"] - 1] == task.eos_id


def test_bad_inputs_are_one_clear_error(tmp_path):
    """Catches errors that do not say which file, line or option is wrong."""
    with pytest.raises(ValueError, match="train_path is required"):
        tasks.get("text")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        tasks.get("text", train_path=bad, eval_path=bad)
    bad.write_text('{"prompt": "a", "answer": "b", "level": -1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'level' \(difficulty_field\) must be an int >= 0"):
        tasks.get("text", train_path=bad, eval_path=bad, difficulty_field="level")
    with pytest.raises(ValueError, match="loss_from applies to plain text"):
        qa(loss_from=4)
    with pytest.raises(ValueError, match="is not a file"):
        tasks.get("text", train_path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds 1 record"):
        tasks.get("text", train_path=bad)
