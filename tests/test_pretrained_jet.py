"""Jet-Nemotron checkpoints: a tiny random JetNemotronForCausalLM (tests/fixtures/jet_nemotron, made by
make_golden_jet.py from NVlabs' modeling code with PyTorch stand-ins for fla) loads with its logits, saves back
exactly, and runs sleep, the stream and a gradient step as a sleepjax model."""

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

FIXTURE = Path(__file__).parent / "fixtures" / "jet_nemotron"


def golden():
    return np.load(FIXTURE / "golden.npz")


def test_config_says_what_was_loaded():
    cfg = pretrained.load_config(FIXTURE)
    assert cfg.layers == ("jet", "attn", "swa", "jet")
    assert (cfg.d_model, cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim) == (64, 4, 2, 16)
    assert (cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim, cfg.jet_conv_size) == (2, 16, 32, 4)
    assert (cfg.jet_conv_reduction, cfg.jet_generator_dim, cfg.jet_norm_eps) == (8, 8, 1e-5)
    assert cfg.swa_window == 5 and cfg.attn_bias and not cfg.qk_norm and cfg.tie_embeddings
    assert cfg.window == 64 and cfg.rope_theta == 100.0 and cfg.norm_weight_offset == 0.0


@pytest.mark.parametrize("window", [None, 13])
def test_logits_match_jet_nemotron(window):
    """One window covering the sequence, N = 1: the original model (swa window 5 < 13 tokens)."""
    ref = golden()
    params = pretrained.load(FIXTURE, **({} if window is None else {"window": window}))
    tokens = jnp.asarray(ref["tokens"])
    logits = sleepjax.forward(params, tokens, jnp.ones(tokens.shape, bool))
    assert rel_err(logits, ref["logits"]) <= 1e-4
    assert rel_err(logits, ref["logits_recurrent"]) <= 1e-4


def test_stream_matches_the_loaded_model():
    ref = golden()
    params = pretrained.load(FIXTURE, window=13)
    tokens = jnp.asarray(ref["tokens"])
    out, stream = run_stream(params, tokens)
    assert rel_err(out, ref["logits"]) <= 1e-4


def test_save_round_trip_is_exact(tmp_path):
    params = pretrained.load(FIXTURE)
    assert pretrained.save(params, tmp_path) == "jet_nemotron"
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["layer_types"] == ["jet", "attn", "swa", "jet"] and hf["efficient_attention_config"]["swa"] == {
        "window_size": 5}
    back = pretrained.load(tmp_path)
    assert back.config == params.config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from safetensors import safe_open

    with safe_open(str(FIXTURE / "model.safetensors"), "np") as f, safe_open(str(tmp_path / "model.safetensors"),
                                                                              "np") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for name in f.keys():
            np.testing.assert_array_equal(f.get_tensor(name), g.get_tensor(name), err_msg=name)


def test_expand_v_survives_jet_nemotrons_truncation():
    for key_dim, value_dim in [(96, 256), (128, 256), (16, 32), (7, 20)]:
        expand = pretrained._expand_v(key_dim, value_dim)
        assert int(key_dim * expand) == value_dim and round(key_dim * expand) == value_dim


def test_sleep_and_a_gradient_step_on_the_loaded_model():
    """Windows of 4 (swa window 5 > 4: there it is full attention), N = 3, sleep_layers=(1, 3); finite loss
    and gradients reaching every jet weight."""
    ref = golden()
    params = pretrained.load(FIXTURE, window=4, sleep_n=3, sleep_layers=(1, 3), eviction="sliding")
    tokens = jnp.asarray(ref["tokens"])
    mask = jnp.zeros(tokens.shape, bool).at[:, 9:].set(True)
    (value, _), grads = jax.value_and_grad(sleepjax.loss, has_aux=True)(params, tokens, mask)
    assert np.isfinite(float(value))
    for name in ("wq", "wv", "conv_w1", "conv_w2", "conv_b2", "a_log", "o_norm"):
        g = np.asarray(grads.layers[0][name])
        assert np.all(np.isfinite(g)) and np.any(g != 0), name
    state = sleepjax.consolidate(params, sleepjax.init_state(params, 2), tokens[:, :4])
    assert [tuple(s.shape) for s in state] == [(2, 2, 16, 32)] * 2


def test_bad_jet_configs_fail_clearly(tmp_path):
    from safetensors.numpy import save_file

    hf = json.loads((FIXTURE / "config.json").read_text())
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    for change, match in [({"layer_types": ["jet", "mamba", "swa", "jet"]}, "layer_types"),
                          ({"efficient_attention_config": {"jet": hf["efficient_attention_config"]["jet"]}},
                           "swa"),
                          ({"num_hidden_layers": 5}, "num_hidden_layers")]:
        (tmp_path / "config.json").write_text(json.dumps({**hf, **change}))
        with pytest.raises(pretrained.CheckpointError, match=match):
            pretrained.load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "layer_types": str(hf["layer_types"])}))
    assert pretrained.load_config(tmp_path).layers == ("jet", "attn", "swa", "jet")
