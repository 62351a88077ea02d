"""The mixers compiled on the default backend (a GPU or TPU): Pallas kernels, the chunked XLA path, cuDNN.

The interpret-mode tests (test_kernels_*_pallas.py) verify the kernel logic on CPU; this module checks what only real
hardware can: that the kernels compile, and that compiled they still match the references (values, final state
and every gradient). It is skipped on a CPU-only JAX. On an accelerator host (also stage "tests" of
bench/gpu_check.sh; sized to pass in under two minutes on one GPU: few cases, each compiling small kernels):

    python -m pytest -q tests/test_kernels_on_device.py

``SLEEPJAX_DEVICE_TESTS_ON_CPU=1`` runs it on CPU in interpret mode at reduced sizes (to check the test itself).
Tolerances are relative to the reference's largest entry: float32 runs true float32 matmuls (measured ~1e-6 in
interpret mode); bf16 runs bf16 operands with float32 accumulation (measured ~5e-3).
"""

import os

import jax
import jax.numpy as jnp
import pytest

from helpers.compare import assert_trees_close, case_key
from helpers.kernels import make_inputs
from sleepjax.kernels import backends, gated_delta_rule, window_attention

ON_CPU = jax.default_backend() == "cpu"
pytestmark = pytest.mark.skipif(
    ON_CPU and os.environ.get("SLEEPJAX_DEVICE_TESTS_ON_CPU") != "1",
    reason="compiled Pallas kernels need a GPU or TPU (SLEEPJAX_DEVICE_TESTS_ON_CPU=1 interprets them)")

TOL = {jnp.float32: 1e-3, jnp.bfloat16: 3e-2}


def _value_and_grads(fn, args, cot):
    """(outputs, gradients w.r.t. every argument) of fn, with a fixed random cotangent on its first output."""

    def objective(*a):
        out = fn(*a)
        first = out[0] if isinstance(out, tuple) else out
        extra = jnp.sum(jnp.sin(out[1])) if isinstance(out, tuple) else 0.0
        return jnp.sum(first.astype(jnp.float32) * cot) + extra, out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, tuple(range(len(args))), has_aux=True))(*args)
    return out, grads


# (B, T, Hk, Hv, Dk, Dv), decay, beta_range, use_delta, dtype; on CPU (interpreted) T and D are cut down.
GDN_CASES = [
    ((2, 200, 2, 4, 64, 128), "normal", "normal", True, jnp.bfloat16),   # odd T, grouped heads, Dk != Dv
    ((1, 513, 1, 1, 128, 128), "strong", "high", True, jnp.bfloat16),    # long, g ~ -10, beta ~ 1
    ((2, 77, 2, 2, 64, 64), "normal", "low", True, jnp.float32),         # beta ~ 0, float32
    ((1, 150, 1, 2, 32, 32), "normal", "normal", False, jnp.float32),    # Hebbian rule, the tiny model's dims
]


@pytest.mark.parametrize("shape,decay,beta_range,use_delta,dtype", GDN_CASES,
                         ids=lambda x: getattr(x, "__name__", None) if isinstance(x, type) else None)
def test_gated_delta_rule_compiled(shape, decay, beta_range, use_delta, dtype):
    """backend="pallas" and "auto" (chunked XLA on GPU) against the float32 token recurrence on the device."""
    if ON_CPU:
        shape = (shape[0], min(shape[1], 40), shape[2], shape[3], 16, 16)
    key_inputs, key_cot = jax.random.split(case_key(shape, decay, beta_range, use_delta, dtype))
    args = make_inputs(key_inputs, *shape, decay=decay, beta_range=beta_range, dtype=dtype, beta_margin=1e-3)
    cot = jax.random.normal(key_cot, shape[:2] + (shape[3], shape[5]))  # [B, T, Hv, Dv]
    with jax.default_matmul_precision("highest"):  # the reference in true float32 (no TF32)
        ref_out, ref_grads = _value_and_grads(
            lambda *a: gated_delta_rule(*a, use_delta=use_delta, backend="recurrent"),
            tuple(a.astype(jnp.float32) for a in args), cot)
    for backend in ("pallas", "auto"):
        out, grads = _value_and_grads(lambda *a: gated_delta_rule(*a, use_delta=use_delta, backend=backend),
                                      args, cot)
        assert out[0].dtype == dtype and out[1].dtype == jnp.float32
        assert_trees_close(out, ref_out, TOL[dtype], f"{backend}: outputs (o, final_state)")
        assert_trees_close(grads, ref_grads, TOL[dtype], f"{backend}: grads (q, k, v, g, beta, s0)")


# (B, T, H, Hkv, D), sliding_window, dtype
ATTENTION_CASES = [
    ((1, 1024, 4, 4, 128), 256, jnp.bfloat16),   # sliding window: fully masked blocks are skipped
    ((2, 300, 4, 2, 64), None, jnp.bfloat16),    # odd length, grouped KV heads (cuDNN too)
    ((1, 100, 2, 1, 32), 7, jnp.float32),        # float32: Pallas (cuDNN has no float32)
]


@pytest.mark.parametrize("shape,sliding_window,dtype", ATTENTION_CASES,
                         ids=lambda x: getattr(x, "__name__", None) if isinstance(x, type) else None)
def test_window_attention_compiled(shape, sliding_window, dtype):
    """backend="pallas", "auto" (cuDNN on GPU where it takes the call) and, on a GPU with bf16, "cudnn" against
    JAX's XLA attention in float32."""
    B, T, H, Hkv, D = shape
    if ON_CPU:
        T, D = min(T, 64), 16
        sliding_window = None if sliding_window is None else 24
    ks = jax.random.split(case_key(shape, sliding_window, dtype), 4)
    q = jax.random.normal(ks[0], (B, T, H, D)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hkv, D)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hkv, D)).astype(dtype)
    cot = jax.random.normal(ks[3], (B, T, H, D))
    local = None if sliding_window is None else (sliding_window - 1, 0)
    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = _value_and_grads(
            lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, local_window_size=local,
                                                    implementation="xla"),
            tuple(a.astype(jnp.float32) for a in (q, k, v)), cot)
    chosen = ["pallas", "auto"]
    if backends.platform_kind() == "gpu" and backends.cudnn_supports(dtype, D):
        chosen.append("cudnn")
    for backend in chosen:
        out, grads = _value_and_grads(
            lambda *a: window_attention(*a, sliding_window=sliding_window, backend=backend), (q, k, v), cot)
        assert out.dtype == dtype
        assert_trees_close(out, ref_out, TOL[dtype], f"{backend}: attention output")
        assert_trees_close(grads, ref_grads, TOL[dtype], f"{backend}: attention grads (q, k, v)")
