"""The hybrid model: config validation, consolidate (pure, N passes), Algorithm 1 forward, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close, case_key, rel_err
from helpers.models import SMALL, random_tokens, small_model
from sleepjax import model as model_lib

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


def random_state(params, B, key):
    return tuple(0.3 * jax.random.normal(k, s.shape) for k, s in
                 zip(jax.random.split(key, params.config.num_gdn_layers), sleepjax.init_state(params, B)))


def unrolled_consolidate(params, state, ctx, n):
    """Reference: the N passes as a Python loop (no scan, no remat)."""
    h = model_lib.embed(params, ctx)
    for _ in range(n):
        h, state = model_lib.blocks_pass(params, h, state)
    return state, h


def reference_forward(params, tokens, loss_mask):
    """Algorithm 1 written directly, one example at a time: Python loop over windows, Python branch on the
    example's own (concrete) mask."""
    cfg = params.config
    rows = []
    for b in range(tokens.shape[0]):
        state = sleepjax.init_state(params, 1)
        logits = []
        for start in range(0, tokens.shape[1], cfg.window):
            ctx = tokens[b:b + 1, start:start + cfg.window]
            mask = np.asarray(loss_mask[b, start:start + cfg.window])
            state, h = unrolled_consolidate(params, state, ctx, 1 if mask.any() else cfg.sleep_n)
            logits.append(model_lib.unembed(params, h))
        rows.append((jnp.concatenate(logits, axis=1), state))
    return (jnp.concatenate([r[0] for r in rows]),
            tuple(jnp.concatenate([r[1][i] for r in rows]) for i in range(cfg.num_gdn_layers)))


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field,value,match", [
    ("sleep_n", 0, "sleep_n must be an int >= 1"),
    ("window", -3, "window must be an int >= 1"),
    ("layers", ("attn", "mlp"), "layers must be a non-empty tuple"),
    ("layers", (), "layers must be a non-empty tuple"),
    ("attn_heads", 3, "attn_heads .* must be a multiple of attn_kv_heads"),
    ("gdn_value_heads", 3, "gdn_value_heads .* must be a multiple of gdn_heads"),
    ("ssm_rule", "hebb", "ssm_rule must be one of"),
    ("dtype", "float16", "dtype must be one of"),
    ("remat", "always", "remat must be one of"),
    ("gdn_backend", "cuda", "gdn_backend must be one of"),
    ("attn_head_dim", 15, "must be even"),
    ("chunk_size", 24, "chunk_size must be a positive multiple of 16"),
])
def test_config_validation(field, value, match):
    cfg = sleepjax.ModelConfig(**{**SMALL, "attn_kv_heads": 2, "gdn_heads": 2})
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(cfg, **{field: value})


def test_defaults_are_the_tiny_model():
    """The other sizes live in experiments/configs/common.py (tests/test_experiments_configs.py)."""
    cfg = sleepjax.ModelConfig()
    assert cfg.d_model == 64 and cfg.layers == ("attn", "gdn", "attn", "gdn") and cfg.mlp_dim == 256
    with pytest.raises(TypeError, match="d_modle"):
        sleepjax.ModelConfig(d_modle=3)


def test_params_are_float32_and_carry_config():
    params = small_model()
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    assert jax.tree_util.tree_unflatten(treedef, leaves).config == params.config


# ---------------------------------------------------------------------------------------------------------------
# consolidate


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=SLOW), pytest.param(3, marks=SLOW)])
def test_consolidate_matches_unrolled_passes(n):
    params = small_model(sleep_n=n)
    ctx = random_tokens(case_key("ctx", n), 2, 8)
    state = random_state(params, 2, case_key("s", n))
    expected, _ = unrolled_consolidate(params, state, ctx, n)
    assert_trees_close(sleepjax.consolidate(params, state, ctx), expected, 1e-5, "eager")
    assert_trees_close(jax.jit(sleepjax.consolidate)(params, state, ctx), expected, 1e-5, "jit")


def test_consolidate_n1_equals_wake_pass_and_n2_differs():
    params = small_model(sleep_n=1)
    ctx = random_tokens(case_key("wake"), 3, 8)
    state = random_state(params, 3, case_key("wake-s"))
    _, wake_state = sleepjax.forward(params, ctx, jnp.ones_like(ctx, bool), state, return_state=True)
    s1 = sleepjax.consolidate(params, state, ctx, n=1)
    assert_trees_close(s1, wake_state, 1e-6, "N=1 vs wake")
    s2 = sleepjax.consolidate(params, state, ctx, n=2)
    assert min(rel_err(a, b) for a, b in zip(s2, s1)) > 1e-2, "a second pass must change the fast weights"


def test_consolidate_short_ctx_and_vmap():
    params = small_model(sleep_n=2)
    ctx = random_tokens(case_key("short"), 2, 5)  # T < window
    state = sleepjax.init_state(params, 2)
    out = jax.vmap(lambda c: sleepjax.consolidate(params, sleepjax.init_state(params, 1), c[None]))(ctx)
    direct = sleepjax.consolidate(params, state, ctx)
    assert_trees_close(tuple(x[:, 0] for x in out), direct, 1e-5, "vmap")


GRAD_TOKENS = random_tokens(case_key("grad"), 2, 20)
GRAD_MASK = jnp.zeros((2, 20), bool).at[:, 16:19].set(True)  # windows 0-1 sleep, window 2 (short) wakes


def loss_grad(params):
    return jax.jit(jax.grad(lambda p: sleepjax.loss(p, GRAD_TOKENS, GRAD_MASK)[0]))(params)


@pytest.fixture(scope="module")
def grads_without_remat():
    params = small_model(sleep_n=4, remat="none")
    return params, loss_grad(params)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["pass", "window", "both"])
def test_gradients_flow_through_four_passes(remat, grads_without_remat):
    params, expected = grads_without_remat
    with_remat = params.replace(config=params.config.replace(remat=remat))
    g = loss_grad(with_remat).replace(config=params.config)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
    # The first window reaches the loss only through the fast weights after 4 sleep passes; the GDN conv
    # (window-local) of the first GDN layer gets gradient through that path.
    assert float(jnp.abs(g.layers[1]["conv"]).max()) > 0
    assert_trees_close(g, expected, 1e-4, f"remat={remat}")


def test_grad_through_consolidate():
    params = small_model(sleep_n=3)
    ctx = random_tokens(case_key("gc"), 2, 8)
    state = random_state(params, 2, case_key("gcs"))
    objective = lambda p, s: sum(jnp.sum(x ** 2) for x in sleepjax.consolidate(p, s, ctx))
    gp, gs = jax.grad(objective, (0, 1))(params, state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves((gp, gs)))
    assert float(jnp.abs(gs[0]).max()) > 0


# ---------------------------------------------------------------------------------------------------------------
# forward (Algorithm 1)


@pytest.mark.parametrize("sleep_n,T,ssm_rule", [pytest.param(1, 24, "delta", marks=SLOW), (3, 21, "delta"),
                                                 pytest.param(2, 19, "hebbian", marks=SLOW)])
def test_forward_matches_reference_algorithm(sleep_n, T, ssm_rule):
    params = small_model(sleep_n=sleep_n, ssm_rule=ssm_rule)
    tokens = random_tokens(case_key("fwd", sleep_n, T), 2, T)
    mask = np.zeros((2, T), bool)
    mask[:, 8:12] = True  # window 1 supervised: wake; windows 0 and 2 sleep
    mask[0, T - 2] = True  # the last window is supervised in example 0 only: example 1 sleeps there
    # jit: the traced mask gets an M schedule (per example everywhere); eager: the schedule derived from the mask
    logits, state = jax.jit(lambda p, t, m: sleepjax.forward(p, t, m, return_state=True))(params, tokens, mask)
    ref_logits, ref_state = reference_forward(params, tokens, mask)
    assert logits.shape == (2, T, 11) and logits.dtype == jnp.float32
    assert rel_err(logits, ref_logits) < 1e-5
    assert_trees_close(state, ref_state, 1e-5, "state")


def test_supervision_decides_sleep():
    """The same tokens give different logits later on when an earlier window sleeps (N=3) or wakes."""
    params = small_model(sleep_n=3)
    tokens = random_tokens(case_key("decide"), 1, 16)
    sleep_mask = jnp.zeros((1, 16), bool).at[:, 10].set(True)
    wake_mask = sleep_mask.at[:, 2].set(True)
    a, b = sleepjax.forward(params, tokens, sleep_mask), sleepjax.forward(params, tokens, wake_mask)
    assert rel_err(a[:, :8], b[:, :8]) > 1e-3 and rel_err(a[:, 8:], b[:, 8:]) > 1e-3


def test_loss_metrics():
    params = small_model()
    tokens = random_tokens(case_key("loss"), 2, 16)
    mask = jnp.zeros((2, 16), bool).at[:, 9:12].set(True)
    value, metrics = sleepjax.loss(params, tokens, mask)
    logits = sleepjax.forward(params, tokens, mask)
    logp = jax.nn.log_softmax(logits[:, 9:12])
    expected = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 10:13, None], -1))
    assert abs(float(value) - float(expected)) < 1e-5
    assert float(metrics["supervised"]) == 6 and 0 <= float(metrics["accuracy"]) <= 1


@pytest.mark.slow
def test_bfloat16_activations():
    params = small_model(sleep_n=2, dtype="bfloat16")
    tokens = random_tokens(case_key("bf16"), 2, 16)
    mask = jnp.zeros((2, 16), bool).at[:, 12].set(True)
    logits, state = sleepjax.forward(params, tokens, mask, return_state=True)
    ref = sleepjax.forward(params.replace(config=params.config.replace(dtype="float32")), tokens, mask)
    assert logits.dtype == jnp.float32 and all(s.dtype == jnp.float32 for s in state)
    assert rel_err(logits, ref) < 5e-2


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors():
    params = small_model()
    state = sleepjax.init_state(params, 2)
    ctx = random_tokens(case_key("bad"), 2, 8)
    with pytest.raises(ValueError, match="ctx must be an integer array"):
        sleepjax.consolidate(params, state, ctx.astype(jnp.float32))
    with pytest.raises(ValueError, match="ctx must have rank 2"):
        sleepjax.consolidate(params, state, ctx[0])
    with pytest.raises(ValueError, match=r"ctx must hold 1 <= T <= window=8"):
        sleepjax.consolidate(params, state, jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=11\)"):
        sleepjax.consolidate(params, state, ctx.at[0, 0].set(11))
    with pytest.raises(ValueError, match="n \\(sleep passes\\) must be an int >= 1"):
        sleepjax.consolidate(params, state, ctx, n=0)
    with pytest.raises(ValueError, match="state\\[0\\] must be float32"):
        sleepjax.consolidate(params, sleepjax.init_state(params, 3), ctx)
    with pytest.raises(ValueError, match="state must be a tuple of 2 fast weights"):
        sleepjax.consolidate(params, state[:1], ctx)
    with pytest.raises(ValueError, match="loss_mask must have shape"):
        sleepjax.forward(params, ctx, jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        sleepjax.init_state(params, 0)
    with pytest.raises(ValueError, match="config must be a ModelConfig"):
        sleepjax.init({"d_model": 3}, jax.random.PRNGKey(0))


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    params = small_model()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "params", params)
        ckpt.wait_until_finished()
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        restored = ckpt.restore(tmp_path / "params", abstract)
    assert restored.config == params.config
    assert_trees_close(restored, params, 0.0, "restored")


@pytest.mark.parametrize("jit", [pytest.param(False, marks=SLOW), True])
def test_a_window_sleeps_iff_the_example_itself_supervises_nothing_there(jit):
    """Window 0 supervised by the LAST example only, by the first only, by all or by none: each example's logits
    are those it gets when every example shares its own choice (wake if it is supervised there, else sleep with
    N = 3), whatever the others do. Catches the decision taken over the batch (``any`` over [B, L]) or over the
    wrong axis. Eager calls derive the schedule from the mask; under jit the traced mask runs M windows."""
    params = small_model(sleep_n=3)
    tokens = random_tokens(case_key("decide-batch"), 3, 24)
    base = np.zeros((3, 24), bool)
    base[:, 20] = True  # the last window wakes in every case
    masks = {}
    for name, rows in (("last", [2]), ("first", [0]), ("all", [0, 1, 2]), ("none", [])):
        m = base.copy()
        m[rows, 3] = True
        masks[name] = (rows, m)
    f = jax.jit(sleepjax.forward) if jit else sleepjax.forward
    out = {name: np.asarray(f(params, tokens, m)) for name, (_, m) in masks.items()}
    assert rel_err(out["none"][:, :8], out["all"][:, :8]) > 1e-2, "sleeping must change the window's logits"
    assert rel_err(out["none"][:, 8:], out["all"][:, 8:]) > 1e-2, "... and, through S, the later windows'"
    for name, (rows, _) in masks.items():
        for b in range(3):
            expected = out["all"][b] if b in rows else out["none"][b]
            assert rel_err(out[name][b], expected) < 1e-5, (name, b)


@pytest.mark.parametrize("remat", ["none", pytest.param("both", marks=SLOW)])
def test_token_stats_equal_the_logits_path_in_chunks(remat, monkeypatch):
    """The training/eval loss (cross-entropy per window, in chunks of positions, never the [B, T, V] logits) equals
    ``token_losses`` of the full logits, values and gradients. Window 24 in head chunks of 16 (the last one padded),
    T = 53 (a short last window): catches a target shifted by one too many, chunk padding read as positions, or
    the last window's positions dropped."""
    monkeypatch.setattr(model_lib, "HEAD_CHUNK_ELEMENTS", 20 * 11)  # 16-position chunks for vocab 11
    params = small_model(sleep_n=3, window=24, remat=remat)
    tokens = random_tokens(case_key("stats", remat), 3, 53)
    mask = jnp.zeros((3, 53), bool).at[:, 30:52].set(True).at[1, 5].set(True)
    ce_ref, correct_ref, mask_ref = model_lib.token_losses(sleepjax.forward(params, tokens, mask), tokens, mask)
    ce, correct, mask_out = model_lib.token_stats(params, tokens, mask)
    assert ce.shape == correct.shape == (3, 52)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(correct, correct_ref)
    np.testing.assert_array_equal(mask_out, mask_ref)
    weights = jax.random.uniform(case_key("stats-w"), (3, 52))
    grads = jax.grad(lambda p: (model_lib.token_stats(p, tokens, mask)[0] * weights).sum())(params)
    grads_ref = jax.grad(lambda p: (model_lib.token_losses(sleepjax.forward(p, tokens, mask), tokens, mask)[0]
                                    * weights).sum())(params)
    assert_trees_close(grads, grads_ref, 1e-4, "gradients ")
