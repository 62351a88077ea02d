"""Pretrained checkpoints: tiny random Qwen3.5 / Qwen3 models saved by transformers (tests/fixtures, made by
make_golden.py) load into sleepjax with transformers' logits, save back exactly, accept inserted GDN layers without
changing the logits, and bad checkpoints fail with a message naming what is wrong."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close, rel_err
from sleepjax import pretrained

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ["qwen3_5_text", "qwen3_5_vl", "qwen3"]


def golden(name):
    return np.load(FIXTURES / name / "golden.npz")


def logits_of(params, tokens):
    tokens = jnp.asarray(tokens)
    return sleepjax.forward(params, tokens, jnp.ones(tokens.shape, bool))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name):
    """One window (window >= T) and N = 1: the model is the original one. Catches any wrong convention
    (norm offset, q/gate interleave, partial RoPE, head order, conv layout, tying)."""
    ref = golden(name)
    params = pretrained.load(FIXTURES / name, window=16, sleep_n=1)
    assert params.config.window >= ref["tokens"].shape[1]
    assert rel_err(logits_of(params, ref["tokens"]), ref["logits"]) <= 1e-4


def test_config_says_what_was_loaded():
    cfg = pretrained.load_config(FIXTURES / "qwen3_5_text")
    assert cfg.layers == ("gdn", "gdn", "attn", "gdn") and cfg.attn_output_gate and cfg.qk_norm
    assert (cfg.gdn_heads, cfg.gdn_value_heads, cfg.attn_heads, cfg.attn_kv_heads) == (2, 4, 4, 2)
    assert cfg.rope_dim == 4 and cfg.norm_weight_offset == 1.0 and not cfg.tie_embeddings
    assert pretrained.load_config(FIXTURES / "qwen3_5_vl").tie_embeddings
    cfg3 = pretrained.load_config(FIXTURES / "qwen3")
    assert cfg3.layers == ("attn",) * 3 and cfg3.rope_dim is None and not cfg3.attn_output_gate


@pytest.mark.parametrize("name", ["qwen3_5_text", "qwen3"])
def test_save_round_trip_is_exact(name, tmp_path):
    """Catches a transposed or mis-split tensor on the way back, and a lost tie."""
    params = pretrained.load(FIXTURES / name)
    assert pretrained.save(params, tmp_path) == name
    again = pretrained.load(tmp_path)
    assert again.config == params.config
    assert_trees_close(again, params, 0.0, "reloaded")
    from safetensors.numpy import load_file

    original, written = load_file(str(FIXTURES / name / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key].astype(np.float32), err_msg=key)


def test_insert_gdn_keeps_the_logits_and_round_trips(tmp_path):
    ref = golden("qwen3")
    params = pretrained.load(FIXTURES / "qwen3", insert_gdn=2, window=16)
    cfg = params.config
    assert cfg.layers == ("attn", "gdn", "attn", "gdn", "attn") and cfg.mlp_free_layers == (1, 3)
    assert "mlp" not in params.layers[1] and float(jnp.abs(params.layers[1]["w_qkv"]).max()) > 0
    assert rel_err(logits_of(params, ref["tokens"]), ref["logits"]) <= 1e-4
    # ... until the inserted layers' output projections move:
    moved = params.replace(layers=tuple({**b, "wo": b["wo"] + 0.1} if i in (1, 3) else b
                                        for i, b in enumerate(params.layers)))
    assert rel_err(logits_of(moved, ref["tokens"]), ref["logits"]) > 1e-3
    assert pretrained.save(params, tmp_path) == "sleepjax"
    assert_trees_close(pretrained.load(tmp_path), params, 0.0, "sleepjax format")


def test_inserted_positions_are_evenly_spaced():
    assert pretrained.inserted_positions(28, 6) == (4, 9, 14, 19, 24, 29)
    assert pretrained.inserted_positions(3, 2) == (1, 3)


@pytest.mark.slow
def test_sleep_on_a_pretrained_model_trains():
    """A few optimizer steps of the sleep loss (N = 2, two windows) through a loaded hybrid lower the loss."""
    import optax

    params = pretrained.load(FIXTURES / "qwen3_5_text", window=8, sleep_n=2, sleep_layers=(1, 3))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 16), 0, 128)
    mask = jnp.zeros((4, 16), bool).at[:, 8:15].set(True)  # window 0 sleeps, window 1 is supervised
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        (value, _), grads = jax.value_and_grad(sleepjax.loss, has_aux=True)(params, tokens, mask)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for _ in range(8):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0], losses


def test_tokenizer_round_trip():
    tok = pretrained.load_tokenizer(FIXTURES / "qwen3")
    text = "Answer: 123"
    assert tok.decode(tok.encode(text).ids) == text


def _copy(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(pretrained.CheckpointError, match="is not a directory"):
        pretrained.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pretrained.CheckpointError, match="config.json is missing"):
        pretrained.load(empty)
    ckpt = _copy("qwen3", tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(pretrained.CheckpointError, match="model_type 'llama' is not supported"):
        pretrained.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(pretrained.CheckpointError, match="rope_type 'yarn'"):
        pretrained.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "head_dim"}))
    with pytest.raises(pretrained.CheckpointError, match="lacks 'head_dim'"):
        pretrained.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    save_file(missing, str(ckpt / "model.safetensors"))
    with pytest.raises(pretrained.CheckpointError, match="'model.layers.1.self_attn.k_norm.weight' is missing"):
        pretrained.load(ckpt)
    save_file({**tensors, "model.norm.weight": np.ones(7, np.float32)}, str(ckpt / "model.safetensors"))
    with pytest.raises(pretrained.CheckpointError, match=r"'model.norm.weight' has shape \(7,\), expected \(24,\)"):
        pretrained.load(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(pretrained.CheckpointError, match="neither model.safetensors nor"):
        pretrained.load(ckpt)


def test_sharded_checkpoint(tmp_path):
    """model.safetensors.index.json with two shards loads like the single file; a missing shard is named."""
    from safetensors.numpy import load_file, save_file

    ckpt = _copy("qwen3_5_text", tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(ckpt / file))
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_trees_close(pretrained.load(ckpt), pretrained.load(FIXTURES / "qwen3_5_text"), 0.0, "sharded")
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(pretrained.CheckpointError, match="model-00002-of-00002.safetensors, listed in"):
        pretrained.load(ckpt)
