"""sleepjax.generate: per-example windows, the prompt consumed window by window, sleep while generating, EOS,
sampling, buckets. The reference is the argmax chain of ``forward`` (Algorithm 1) over prompt + generated text with
every window before the predicting position's asleep, and the token-by-token stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import case_key
from helpers.models import SMALL, make_params, random_tokens, run_stream
from sleepjax.generate import TRACES, Generation, bucket

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)
# Prompt lengths around the window (L = 8): inside the first window, one that fills the window with its last token,
# and prompts spanning one and two full windows: sleep happens while the prompt is consumed and while generating.
LENGTHS = (3, 8, 13, 17)
NEW = 14
_forward = jax.jit(sleepjax.forward, static_argnames=("return_state", "schedule"))


def model(sleep_n=2, **overrides):
    """SMALL with two layers (attn, gdn): every path the generation runs, at half the compile time."""
    cfg = sleepjax.ModelConfig(**{**SMALL, "layers": ("attn", "gdn"), "remat": "none", "sleep_n": sleep_n,
                                  **overrides})
    return sleepjax.init(cfg, case_key("generate", sleep_n, tuple(sorted(overrides.items()))))


def prompts_of(tag, lengths=LENGTHS, vocab=11):
    tokens = np.asarray(random_tokens(case_key("prompts", tag), len(lengths), max(lengths), vocab))
    return [tokens[b, :n].tolist() for b, n in enumerate(lengths)]


def assert_forward_chain(params, prompts, out: Generation, wake_prompt=False):
    """Every generated token is the argmax of ``forward``'s logits at the position before it, the window holding
    that position awake (supervised) and every earlier window asleep (``wake_prompt``: every window awake, as
    ``generate(wake=all, consolidate=False)`` runs). One batched forward: a row per (example, window)."""
    L = params.config.window
    seqs = [p + g for p, g in zip(prompts, out.sequences())]
    T = max(map(len, seqs))
    rows, masks, checks = [], [], []
    for b, (p, seq) in enumerate(zip(prompts, seqs)):
        positions = range(len(p) - 1, len(seq) - 1)  # the positions whose prediction was generated
        for w in sorted({t // L for t in positions}):
            mask = np.zeros(T, bool)
            mask[:len(seq)] = wake_prompt
            mask[w * L:(w + 1) * L] = True
            rows.append(seq + [0] * (T - len(seq)))
            masks.append(mask)
            checks.append([(t, seq[t + 1]) for t in positions if t // L == w])
    logits = np.asarray(_forward(params, jnp.asarray(rows, jnp.int32), jnp.asarray(np.stack(masks))))
    for row, pairs in enumerate(checks):
        for t, token in pairs:
            # argmax, allowing float-rounding ties between the window and one-token paths
            assert logits[row, t, token] >= logits[row, t].max() - 1e-4, (row, t, token, logits[row, t])
    assert sum(map(len, checks)) == int(out.lengths.sum())


@pytest.fixture(scope="module")
def greedy_run():
    params = model()
    prompts = prompts_of("greedy")
    return params, prompts, sleepjax.generate(params, prompts, NEW)


def test_greedy_is_the_forward_argmax_chain(greedy_run):
    # Catches: windows counted from the batch's first slot instead of each example's own first token, a prompt
    # window consumed with the wrong state, context or conv cache, a missed or extra sleep while generating.
    params, prompts, out = greedy_run
    assert out.tokens.shape == (len(prompts), NEW) and out.lengths.tolist() == [NEW] * len(prompts)
    assert_forward_chain(params, prompts, out)


def test_sleeps_where_the_stream_says(greedy_run):
    # Catches: a sleep counted (or run) for every example when only one window filled, or at the wrong token.
    params, prompts, out = greedy_run
    L = params.config.window
    for b, (p, g) in enumerate(zip(prompts, out.sequences())):
        fed = jnp.asarray([p + g[:-1]], jnp.int32)  # the last new token is never fed back
        logits, stream = run_stream(params, fed)
        assert int(out.sleeps[b]) == int(stream.sleeps) == (len(p) + len(g) - 1) // L
        assert np.argmax(np.asarray(logits[0, len(p) - 1:]), -1).tolist() == g


def test_eos_stops_one_example_while_the_others_continue(greedy_run):
    # Catches: EOS ending the whole batch, tokens emitted after EOS, a finished example's stream still advancing
    # (it would change nothing visible but the sleeps count).
    params, prompts, out = greedy_run
    rows = out.sequences()
    eos = next(t for t in rows[0][1:] if t not in rows[1])  # ends example 0 (not at its first token), not example 1
    stopped = sleepjax.generate(params, prompts, NEW, eos_id=eos, pad_id=5)
    L = params.config.window
    for b, row in enumerate(rows):
        n = row.index(eos) + 1 if eos in row else NEW
        assert stopped.lengths[b] == n
        assert stopped.tokens[b].tolist() == row[:n] + [5] * (NEW - n)
        assert stopped.sleeps[b] == (len(prompts[b]) + n - 1) // L
    assert stopped.lengths[0] < NEW and stopped.lengths[1] == NEW


def test_sampling_is_reproducible_per_key_and_top_k_1_is_greedy(greedy_run):
    # Catches: draws that ignore the key (or depend on something else), top-k keeping more than k tokens.
    params, prompts, out = greedy_run
    a = sleepjax.generate(params, prompts, NEW, temperature=1.0, key=jax.random.PRNGKey(1))
    b = sleepjax.generate(params, prompts, NEW, temperature=1.0, key=jax.random.PRNGKey(1))
    c = sleepjax.generate(params, prompts, NEW, temperature=1.0, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens != out.tokens).any()
    top1 = sleepjax.generate(params, prompts, NEW, temperature=1.0, top_k=1, top_p=0.5, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(top1.tokens, out.tokens)


def test_no_recompile_within_a_bucket(greedy_run):
    # Catches: the prompt length (not its bucket) reaching a static shape: a compile per prompt.
    params, _, _ = greedy_run
    tokens = np.asarray(random_tokens(case_key("bucket"), 2, 16))
    traces = TRACES["generate"]
    first = sleepjax.generate(params, tokens, 3, lengths=[9, 16])  # 9..16 tokens: the 2-window bucket
    again = sleepjax.generate(params, tokens[:, :12], 3, lengths=[12, 10])
    assert TRACES["generate"] - traces <= 1
    assert bucket(9, 8) == bucket(16, 8) == 16 and bucket(17, 8) == 32
    again = sleepjax.generate(params, tokens, 3, lengths=[11, 14])
    assert TRACES["generate"] - traces <= 1
    same = sleepjax.generate(params, [tokens[0, :9].tolist(), tokens[1].tolist()], 3)  # a list: the same call
    np.testing.assert_array_equal(same.tokens, first.tokens)
    assert again.tokens.shape == (2, 3)


def test_bad_arguments():
    # Catches: a bad call failing deep inside a trace (or not at all) instead of one line naming the argument.
    params = model()
    for kwargs, match in [(dict(prompts=[[1, 2], []], max_new_tokens=2), "every prompt needs"),
                          (dict(prompts=[[1, 99]], max_new_tokens=2), "prompt ids"),
                          (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
                          (dict(prompts=[[1]], max_new_tokens=2, temperature=0.5), "needs a key"),
                          (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), "top_p"),
                          (dict(prompts=[[1]], max_new_tokens=2, top_k=-1), "top_k"),
                          (dict(prompts=[[1]], max_new_tokens=2, eos_id=11), "eos_id"),
                          (dict(prompts="hello", max_new_tokens=2), "list of int sequences"),
                          (dict(prompts=np.zeros((2, 3), np.int32), max_new_tokens=2, lengths=[1]), "lengths")]:
        with pytest.raises(ValueError, match=match):
            sleepjax.generate(params, **kwargs)


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(eviction="sliding"), marks=SLOW),
    pytest.param(dict(eviction="sliding", sleep_layers=(1, 2), layers=("attn", "gdn", "attn")), marks=SLOW),
    pytest.param(dict(layers=("jet", "swa", "gdn"), swa_window=3, attn_bias=True, jet_heads=2, jet_key_dim=8,
                      jet_value_dim=4, jet_conv_size=3, jet_conv_reduction=2), marks=SLOW),
    pytest.param(dict(layers=("attn", "jet"), loop_steps=2, sandwich_norm_layers=(0,), mlp_free_layers=(1,),
                      jet_heads=2, jet_key_dim=8, jet_value_dim=4, eviction="sliding"), marks=SLOW),
    pytest.param(dict(sleep_n=1), marks=SLOW),
])
def test_greedy_chain_for_every_layer_kind_and_eviction(overrides):
    # Catches: a layer kind, eviction policy, sleep_layers or looped stack the prefill or the per-example step
    # gets wrong (sliding context kept per example, jet's conv cache, one KV cache per loop).
    overrides = dict(overrides)
    params = model(overrides.pop("sleep_n", 3), **overrides)
    prompts = prompts_of(("kinds", tuple(sorted(overrides))))
    assert_forward_chain(params, prompts, sleepjax.generate(params, prompts, NEW))


@SLOW
def test_wake_windows_follow_algorithm_1():
    # Catches: ``wake``/``consolidate=False`` still running the N passes (the training-time choice for supervised
    # windows, which free-generation evaluation relies on).
    params = model(3)
    prompts = prompts_of("wake")
    wake = np.ones((len(prompts), max(LENGTHS)), bool)
    out = sleepjax.generate(params, prompts, NEW, wake=wake, consolidate=False)
    assert_forward_chain(params, prompts, out, wake_prompt=True)
    assert out.sleeps.tolist() == [0] * len(prompts)


@SLOW
def test_tiny_reference_model_generates_its_forward_chain():
    # Catches: grouped heads (4 query heads on 2 kv heads, 4 GDN value heads on 2 key heads) in the prefill caches.
    params = make_params("generate-tiny", sleep_n=2)
    prompts = prompts_of("tiny", (2, 6, 7, 15), vocab=13)
    assert_forward_chain(params, prompts, sleepjax.generate(params, prompts, 10))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation by free generation (sleepjax/evaluate.py)


def depo_case(word_len, sleep_n):
    """A 3-window Depo batch (the graph, then two windows of questions) and a small model for it whose own greedy
    chain is written into rows 0 and 1 as their answers (teacher-forced exact there, by construction)."""
    from helpers.depo import cpu_depo

    task = cpu_depo(questions=8, word_len_min=word_len, word_len_max=word_len, max_nodes=4, min_nodes=4)
    params = model(sleep_n, vocab_size=task.vocab_size, window=task.window)
    batch = task.batch(0, 0, 4, "test")
    tokens = batch["tokens"].copy()
    for t in sorted({int(t) for t in np.flatnonzero((batch["item"][:2] >= 0).any(0))}):
        logits = _forward(params, jnp.asarray(tokens), jnp.asarray(batch["loss_mask"]))
        tokens[:2, t + 1] = np.where(batch["item"][:2, t] >= 0, np.argmax(np.asarray(logits[:2, t]), -1),
                                     tokens[:2, t + 1])
    return task, params, dict(batch, tokens=tokens)


@pytest.mark.parametrize("word_len,sleep_n,sleep", [(2, 2, "unsupervised"),
                                                    pytest.param(1, 2, "unsupervised", marks=SLOW),
                                                    pytest.param(2, 1, "always", marks=SLOW)])
def test_generation_exact_equals_teacher_forced_exact(word_len, sleep_n, sleep):
    # Catches: a prompt cut at the wrong position, an answer compared off by one, items mixed up between rows,
    # generation that sleeps where the teacher-forced forward wakes (single- and two-token answers).
    from sleepjax.evaluate import evaluate_generation, score_batch, score_generation

    task, params, batch = depo_case(word_len, sleep_n)
    free = score_generation(params, batch, num_items=task.num_items, sleep=sleep)
    forced = jax.jit(score_batch, static_argnames=("num_items",))(
        params, batch["tokens"], batch["loss_mask"], batch["item"], num_items=task.num_items)
    assert free["present"].sum() == 4 * task.num_items
    np.testing.assert_array_equal(free["exact"], np.asarray(forced["exact"]))
    assert free["exact"][:2].all(), "rows 0 and 1 hold the model's own greedy answers"
    assert free["generated"].shape[-1] == word_len
    metrics = evaluate_generation(params, [batch], num_items=task.num_items, difficulty_name="k", sleep=sleep)
    assert metrics["exact_generated"] == metrics["exact_teacher_forced"] == free["exact"].mean() >= 0.5
    assert metrics["items"] == 4 * task.num_items and "exact_generated/k=1" in metrics
    alone = evaluate_generation(params, [batch], num_items=task.num_items, difficulty_name="k", sleep=sleep,
                                teacher_forced=False)
    assert alone == {k: v for k, v in metrics.items() if "teacher_forced" not in k}


@SLOW
def test_generation_that_always_sleeps_can_differ_from_teacher_forcing():
    # Catches: sleep="always" silently running Algorithm 1's training-time choice (it must sleep the supervised
    # window before the last questions, which teacher forcing wakes).
    from sleepjax.evaluate import score_generation

    task, params, batch = depo_case(1, 4)
    always = score_generation(params, batch, num_items=task.num_items, sleep="always")
    woken = score_generation(params, batch, num_items=task.num_items, sleep="unsupervised")
    assert (always["generated"] != woken["generated"]).any()
    last_window = task.question_starts >= 2 * task.window  # questions whose prompt holds a full supervised window
    np.testing.assert_array_equal(always["generated"][:, ~last_window], woken["generated"][:, ~last_window])
