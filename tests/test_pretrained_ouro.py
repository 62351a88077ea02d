"""Ouro checkpoints: a tiny random OuroForCausalLM (tests/fixtures/ouro, made by make_golden_ouro.py from the Ouro
modeling code) loads with its logits (3 loops, four norms per layer), saves back exactly in the sleepjax format,
takes inserted MLP-free JetBlocks (the paper's Ouro recipe) without changing its logits, and sleeps."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import rel_err
from helpers.models import run_stream
from sleepjax import pretrained

FIXTURE = Path(__file__).parent / "fixtures" / "ouro"


def golden():
    return np.load(FIXTURE / "golden.npz")


def test_config_says_what_was_loaded():
    cfg = pretrained.load_config(FIXTURE)
    assert cfg.layers == ("attn",) * 3 and cfg.loop_steps == 3 and cfg.sandwich_norm_layers == (0, 1, 2)
    assert (cfg.d_model, cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim, cfg.mlp_dim) == (32, 4, 2, 8, 40)
    assert not cfg.qk_norm and not cfg.attn_bias and not cfg.tie_embeddings and cfg.norm_weight_offset == 0.0
    assert cfg.window == 64 and cfg.rope_theta == 100.0 and cfg.num_attn_layers == 9  # a KV cache per loop


@pytest.mark.parametrize("window", [None, 11])
def test_logits_match_ouro(window):
    """One window covering the sequence, N = 1: the original model, last loop (Ouro's default exit)."""
    ref = golden()
    params = pretrained.load(FIXTURE, **({} if window is None else {"window": window}))
    tokens = jnp.asarray(ref["tokens"])
    logits = sleepjax.forward(params, tokens, jnp.ones(tokens.shape, bool))
    assert rel_err(logits, ref["logits"]) <= 1e-4
    one_loop = pretrained.load(FIXTURE, loop_steps=1)  # total_ut_steps=1: the loop count is honoured
    assert rel_err(sleepjax.forward(one_loop, tokens, jnp.ones(tokens.shape, bool)), ref["logits_loop1"]) <= 1e-4


def test_stream_matches_the_loaded_model():
    ref = golden()
    params = pretrained.load(FIXTURE, window=11)
    out, _ = run_stream(params, jnp.asarray(ref["tokens"]))
    assert rel_err(out, ref["logits"]) <= 1e-4


def test_save_round_trip_is_exact(tmp_path):
    params = pretrained.load(FIXTURE)
    assert pretrained.save(params, tmp_path) == "sleepjax"  # no Hugging Face class writes a looped model here
    back = pretrained.load(tmp_path)
    assert back.config == params.config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inserted_jet_blocks_keep_the_logits():
    """The paper's Ouro recipe: MLP-free JetBlocks inserted between the looped layers (each looping with the
    rest, with its own fast weights per loop), output projections at zero: the logits are the checkpoint's."""
    ref = golden()
    params = pretrained.load(FIXTURE, insert_gdn=2, insert_kind="jet", window=11)
    cfg = params.config
    assert cfg.layers == ("attn", "jet", "attn", "jet", "attn")
    assert cfg.mlp_free_layers == (1, 3) and cfg.sandwich_norm_layers == (0, 2, 4)
    assert (cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim) == (4, 8, 16) and cfg.num_fast_layers == 6
    tokens = jnp.asarray(ref["tokens"])
    assert rel_err(sleepjax.forward(params, tokens, jnp.ones(tokens.shape, bool)), ref["logits"]) <= 1e-4


@pytest.mark.slow
def test_inserted_jet_blocks_train_through_sleep():
    """A sleeping window of the looped model gives a gradient to every inserted JetBlock's output projection."""
    ref = golden()
    params = pretrained.load(FIXTURE, insert_gdn=2, insert_kind="jet", window=4, sleep_n=2)
    tokens = jnp.asarray(ref["tokens"])
    mask = jnp.zeros(tokens.shape, bool).at[:, 8:].set(True)
    (value, _), grads = jax.value_and_grad(sleepjax.loss, has_aux=True)(params, tokens, mask)
    assert np.isfinite(float(value))
    for layer in (1, 3):  # W_o = 0 first: only it has a gradient until it moves
        g = np.asarray(grads.layers[layer]["wo"])
        assert np.all(np.isfinite(g)) and np.any(g != 0), layer


def test_bad_ouro_configs_fail_clearly(tmp_path):
    from safetensors.numpy import save_file

    hf = json.loads((FIXTURE / "config.json").read_text())
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    for change, match in [({"use_sliding_window": True}, "sliding"), ({"total_ut_steps": 0}, "total_ut_steps"),
                          ({"num_hidden_layers": None}, "num_hidden_layers")]:
        (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
        with pytest.raises((pretrained.CheckpointError, ValueError), match=match):
            pretrained.load_config(tmp_path)
    with pytest.raises(ValueError, match="insert_kind"):
        pretrained.load_config(FIXTURE, insert_gdn=1, insert_kind="mamba")
