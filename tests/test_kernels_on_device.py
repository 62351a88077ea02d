"""The public kernels with ``backend="pallas"`` on the default backend: compiled Triton / Mosaic on a GPU or TPU.

The interpret-mode tests (test_pallas_*.py) verify the kernel logic on CPU; this module checks what only real
hardware can: that the kernels compile, and that compiled they still match the references (values, final state
and every gradient). It is skipped on a CPU-only JAX. On an accelerator host:

    python -m pytest -q tests/test_kernels_on_device.py

``SLEEPJAX_DEVICE_TESTS_ON_CPU=1`` runs it on CPU in interpret mode (to check the test itself). Tolerances are
relative to the reference's largest entry and allow for TF32 matmuls, which GPUs may use for float32 dots.
"""

import os

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_trees_close, case_key
from test_pallas_gdn import make_inputs
from sleepjax.kernels import gated_delta_rule, window_attention

pytestmark = pytest.mark.skipif(
    jax.default_backend() == "cpu" and os.environ.get("SLEEPJAX_DEVICE_TESTS_ON_CPU") != "1",
    reason="compiled Pallas kernels need a GPU or TPU (SLEEPJAX_DEVICE_TESTS_ON_CPU=1 interprets them)")

TOL = {jnp.float32: 2e-2, jnp.bfloat16: 5e-2}


def _value_and_grads(fn, args, cot):
    """(outputs, gradients w.r.t. every argument) of fn, with a fixed random cotangent on its first output."""

    def objective(*a):
        out = fn(*a)
        first = out[0] if isinstance(out, tuple) else out
        extra = jnp.sum(out[1]) if isinstance(out, tuple) else 0.0
        return jnp.sum(first.astype(jnp.float32) * cot) + extra, out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "hebbian"])
@pytest.mark.parametrize("shape,decay,beta_range", [
    ((2, 200, 2, 4, 64, 128), "normal", "normal"),   # odd T, grouped value heads, Dk != Dv
    ((1, 513, 1, 1, 128, 128), "strong", "high"),    # long, strong decay, beta near 1
    ((2, 77, 2, 2, 64, 64), "normal", "low"),        # beta near 0
])
def test_gated_delta_rule_compiled(shape, decay, beta_range, use_delta, dtype):
    key_inputs, key_cot = jax.random.split(case_key(shape, decay, beta_range, use_delta, dtype))
    args = make_inputs(key_inputs, *shape, decay=decay, beta_range=beta_range, dtype=dtype)
    cot = jax.random.normal(key_cot, shape[:2] + (shape[3], shape[5]))  # [B, T, Hv, Dv]
    out, grads = _value_and_grads(
        lambda *a: gated_delta_rule(*a, use_delta=use_delta, backend="pallas"), args, cot)
    # Reference: the token recurrence in float32 on the same device.
    ref_args = tuple(a.astype(jnp.float32) for a in args)
    ref_out, ref_grads = _value_and_grads(
        lambda *a: gated_delta_rule(*a, use_delta=use_delta, backend="recurrent"), ref_args, cot)
    assert out[0].dtype == dtype and out[1].dtype == jnp.float32
    assert_trees_close(out, ref_out, TOL[dtype], "outputs (o, final_state)")
    assert_trees_close(grads, ref_grads, TOL[dtype], "grads (q, k, v, g, beta, s0)")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,sliding_window", [
    ((2, 300, 4, 2, 64), None),     # odd length, grouped KV heads
    ((1, 1024, 4, 4, 128), 256),    # sliding window: fully masked blocks are skipped
    ((2, 65, 2, 1, 64), 7),
])
def test_window_attention_compiled(shape, sliding_window, dtype):
    B, T, H, Hkv, D = shape
    ks = jax.random.split(case_key(shape, sliding_window, dtype), 4)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D)).astype(dtype)
    cot = jax.random.normal(ks[3], (B, T, H, D))
    out, grads = _value_and_grads(
        lambda *a: window_attention(*a, sliding_window=sliding_window, backend="pallas"), (q, k, v), cot)
    # Reference: JAX's own attention (XLA implementation) in float32.
    local = None if sliding_window is None else (sliding_window - 1, 0)
    ref_out, ref_grads = _value_and_grads(
        lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, local_window_size=local, implementation="xla"),
        tuple(a.astype(jnp.float32) for a in (q, k, v)), cot)
    assert out.dtype == dtype
    assert_trees_close(out, ref_out, TOL[dtype], "attention output")
    assert_trees_close(grads, ref_grads, TOL[dtype], "attention grads (q, k, v)")
