"""Generation: prompts of different lengths -> new tokens, with the model sleeping as it streams.

``generate`` is Algorithm 1 at inference, per sequence: each prompt's windows count from its own first token; the
prompt is consumed window by window in one call (``stream_prefill``: every full window sleeps, N passes, and its
KV cache is dropped, or kept as context under sliding eviction), then one wake pass per new token
(``stream_step``), a window sleeping whenever it fills, each sequence stopping at its EOS. It gives what feeding the
prompt token by token to the stream gives, and greedy decoding is the argmax chain of ``forward`` over prompt +
generated text with every earlier window asleep (tests/test_generate.py).

One compiled function per (batch size, prompt bucket, max_new_tokens, sampling mode): prompts are padded to a
bucket of ``window * 2^k`` tokens, so prompts of other lengths in the same bucket reuse it.
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleepjax.model import Params
from sleepjax.stream import stream_prefill, stream_step

TRACES: collections.Counter = collections.Counter()  # how often each jitted function was traced (tests read it)


class Generation(NamedTuple):
    """What ``generate`` returns. tokens int32 [B, max_new_tokens]: each sequence's new tokens (its EOS included),
    then ``pad_id``; lengths int32 [B]: how many are real; sleeps int32 [B]: the windows each sequence consolidated
    (prompt and generation; the last new token is never fed back, so it fills no window)."""

    tokens: np.ndarray
    lengths: np.ndarray
    sleeps: np.ndarray

    def sequences(self) -> list[list[int]]:
        """The new tokens of each sequence, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def bucket(length: int, window: int) -> int:
    """The padded prompt length: ``window`` times the next power of two of the windows ``length`` spans."""
    windows = max(1, -(-int(length) // window))
    return window * (1 << (windows - 1).bit_length())


def generate(params: Params, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None, key=None, lengths=None, pad_id: int = 0,
             wake=None, consolidate: bool = True) -> Generation:
    """New tokens for every prompt: ``prompts`` is a list of int sequences (lengths may differ), or an int array
    [B, T] with ``lengths`` [B] (the real tokens of each row; default T).

    Greedy when ``temperature`` is 0; otherwise sampling from softmax(logits / temperature), restricted to the
    ``top_k`` most likely tokens (0: all) and to the smallest set whose probability reaches ``top_p``; each
    sequence's draws depend only on (``key``, its row, the step), so the same key gives the same text. A sequence
    stops after emitting ``eos_id`` (None: never); the rest of its row is ``pad_id``.

    ``wake`` (bool like the padded prompts, optional) and ``consolidate`` give Algorithm 1's training-time choice
    (evaluation by free generation): prompt windows with a ``wake`` position, and with ``consolidate`` False every
    window that fills during generation, close without sleeping (one pass, as a supervised window).
    """
    cfg = params.config
    tokens, lengths = _prompt_array(prompts, lengths, cfg.vocab_size)
    B, T = tokens.shape
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no limit), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                  or not 0 <= value < cfg.vocab_size):
            raise ValueError(f"{name} must be None or an id in [0, vocab_size={cfg.vocab_size}), got {value!r}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a key (jax.random.PRNGKey(seed))")
    padded = bucket(T, cfg.window)
    tokens = np.pad(tokens, ((0, 0), (0, padded - T)))
    if wake is not None:
        wake = np.asarray(wake, bool)
        if wake.shape != (B, T):
            raise ValueError(f"wake must be a bool array [B, T] = {(B, T)} like the prompts, got {wake.shape}")
        wake = np.pad(wake, ((0, 0), (0, padded - T)))
    key = jax.random.PRNGKey(0) if key is None else key
    out, n, sleeps = _generate(params, jnp.asarray(tokens), jnp.asarray(lengths), key, jnp.float32(temperature or 1.0),
                               jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id),
                               None if wake is None else jnp.asarray(wake), max_new_tokens=int(max_new_tokens),
                               greedy=greedy, top_k=int(top_k), use_top_p=top_p < 1, consolidate=bool(consolidate))
    out, n, sleeps = jax.device_get((out, n, sleeps))
    return Generation(tokens=np.asarray(out), lengths=np.asarray(n), sleeps=np.asarray(sleeps))


def _prompt_array(prompts, lengths, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, T] padded with 0, lengths int32 [B]) from a list of sequences or an array + lengths."""
    if hasattr(prompts, "shape"):
        tokens = np.asarray(prompts)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompts as an array must be int [B, T], got {tokens.dtype} {tokens.shape}")
        lengths = np.full(tokens.shape[0], tokens.shape[1]) if lengths is None else np.asarray(lengths)
        if lengths.shape != tokens.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths must be an int array [B={tokens.shape[0]}], got {lengths.dtype} {lengths.shape}")
    else:
        if lengths is not None:
            raise ValueError("lengths goes with prompts given as an array [B, T]; a list of sequences has its own")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not all(
                isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, (str, bytes)) for p in prompts):
            raise ValueError("prompts must be a list of int sequences (token ids) or an int array [B, T]")
        rows = [np.asarray(p).reshape(-1) for p in prompts]
        if any(r.size and not np.issubdtype(r.dtype, np.integer) for r in rows):
            raise ValueError("prompts must hold integer token ids")
        lengths = np.asarray([r.size for r in rows])
        tokens = np.zeros((len(rows), max([1, *lengths])), np.int64)
        for i, r in enumerate(rows):
            tokens[i, :r.size] = r
    if tokens.shape[0] == 0:
        raise ValueError("prompts must hold at least one prompt")
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
        raise ValueError(f"every prompt needs 1..T={tokens.shape[1]} tokens, got lengths in "
                         f"[{lengths.min()}, {lengths.max()}]")
    real = np.arange(tokens.shape[1]) < lengths[:, None]
    values = tokens[real]
    if values.min() < 0 or values.max() >= vocab_size:
        raise ValueError(f"prompt ids must lie in [0, vocab_size={vocab_size}), got range [{values.min()}, "
                         f"{values.max()}]")
    return np.where(real, tokens, 0).astype(np.int32), lengths.astype(np.int32)


def _choose(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """The next token of each row of logits [B, V]: argmax, or a draw from the tempered, truncated softmax with
    row b's key fold_in(key, b)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:  # keep the most likely tokens until their probability reaches top_p (at least one)
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy", "top_k", "use_top_p", "consolidate"))
def _generate(params: Params, tokens, lengths, key, temperature, top_p, eos_id, pad_id, wake, *,
              max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool, consolidate: bool):
    TRACES["generate"] += 1
    B = tokens.shape[0]
    # The prompt but its last token in parallel; the last token is the first one the loop feeds.
    stream = stream_prefill(params, tokens, lengths - 1, wake=wake)
    first = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    choose = functools.partial(_choose, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

    def more(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, stream, token, done, out, count = carry
        logits, stream = stream_step(params, stream, token, active=~done, consolidate=consolidate)
        new = jnp.where(done, pad_id, choose(logits, jax.random.fold_in(key, i), temperature, top_p))
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
        count = count + (~done).astype(jnp.int32)
        return i + 1, stream, new, done | (new == eos_id), out, count

    init = (jnp.int32(0), stream, first, jnp.zeros((B,), bool), jnp.full((B, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((B,), jnp.int32))
    _, stream, _, _, out, count = jax.lax.while_loop(more, step, init)
    return out, count, stream.sleeps
