"""Reading a Depo sequence back as text, without the task's internals, and the CPU-scale Depo."""

from experiments.configs.depo import CPU_TASK
from sleepjax.tasks.depo import Depo


def cpu_depo(**options):
    """The CPU-scale Depo of experiments/configs/depo.py (its tiny_k4 preset), ``options`` changed."""
    return Depo(**{**CPU_TASK, **options})


def read_word(vocab, tokens, pos):
    """(word as a tuple of token strings, position after it): inner 'w' tokens up to and including an 'e' token."""
    word = []
    while True:
        token = vocab[tokens[pos]]
        assert token[0] in "we" and token[1:].isdigit(), f"expected a word token at {pos}, got {token}"
        word.append(token)
        pos += 1
        if token[0] == "e":
            return tuple(word), pos


def parse(task, tokens):
    """Reads the sequence back as text: (edges [(src, dst)], questions [dict]) without using the task's internals."""
    vocab = task.vocab
    words, pos = [], 0
    while pos < task.context_len:
        if vocab[tokens[pos]] in ("PAD", "BOS", "SEP"):
            pos += 1
            continue
        word, pos = read_word(vocab, tokens, pos)
        words.append(word)
    assert pos == task.context_len, "a word crosses into the question region"
    assert len(words) % 2 == 0
    edges = list(zip(words[0::2], words[1::2]))

    questions, pos = [], task.context_len
    while pos < len(tokens):
        token = vocab[tokens[pos]]
        if token == "PAD":
            pos += 1
            continue
        assert token.startswith("HOP"), f"expected HOPk at {pos}, got {token}"
        start = pos
        query, pos = read_word(vocab, tokens, pos + 1)
        assert vocab[tokens[pos]] == "ANS"
        ans_pos = pos
        answer, pos = read_word(vocab, tokens, pos + 1)
        questions.append(dict(k=int(token[3:]), query=query, answer=answer, start=start, ans_pos=ans_pos, end=pos))
    return edges, questions


def follow(edges, word, k):
    successor = dict(edges)
    for _ in range(k):
        word = successor[word]
    return word
