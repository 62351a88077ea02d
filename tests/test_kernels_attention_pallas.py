"""Pallas flash attention (kernels/attention_pallas.py, attention_gpu.py, attention_tpu.py) in interpret mode
against independent references.

Forward: a float64 NumPy softmax. Gradients (q, k, v): float64 autodiff of a plain jnp softmax attention.
Also: the masked-block skipping ranges cover exactly what the mask needs, and the kernel runs under shard_map.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.compare import case_key, rel_err
from helpers.kernels import allowed, attention_float64_grads, interpreter, make_qkv, numpy_attention
from sleepjax.kernels import attention, attention_blocks, attention_pallas
from sleepjax.kernels.attention_pallas import AttentionBlockSizes

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


def run_kernel(q, k, v, cot, **kw):
    def f(q, k, v):
        o = attention_pallas.window_attention_pallas(q, k, v, **{"interpret": True, **kw})
        return jnp.sum(o.astype(jnp.float32) * cot), o

    (_, o), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


B16 = AttentionBlockSizes(16, 16, 16, 16, 16, 16)
MIXED = AttentionBlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)

# (platform, B, T, H, Hkv, D, window, dtype, block_sizes)
CASES = [
    ("gpu", 1, 40, 2, 1, 32, None, "float32", None),        # default blocks, one block
    ("gpu", 1, 100, 4, 2, 16, 24, "float32", MIXED),        # sliding window, skipped blocks, mixed tiles
    ("gpu", 2, 33, 2, 2, 8, 5, "float32", B16),             # head dim padded 8 -> 16
    ("gpu", 1, 64, 4, 1, 32, 16, "bfloat16", B16),          # bf16, 4 query heads per KV head
    ("gpu", 1, 50, 2, 2, 16, 1, "float32", B16),            # window 1: each query sees itself only
    ("gpu", 1, 1, 1, 1, 16, None, "float32", None),         # one token
    ("tpu", 1, 70, 2, 1, 16, 20, "float32", MIXED),         # TPU grid wrapper (band grid axis)
    ("tpu", 1, 48, 2, 2, 32, None, "bfloat16", B16),
]

FAST_CASES = [CASES[1], CASES[6]]  # the default run's (GPU and TPU wrappers); the others run with -m slow


def _case_id(c):
    return "{}-B{}-T{}-H{}kv{}-D{}-w{}-{}-{}".format(*c[:8], "mixed" if c[8] is MIXED else "b16" if c[8] else "dflt")


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=SLOW, id=_case_id(c)) for c in CASES],
                         ids=_case_id)
def test_kernel_matches_references(case):
    platform, B, T, H, Hkv, D, window, dtype, blocks = case
    dtype = jnp.dtype(dtype)
    key = case_key("pallas-attn", case)
    q, k, v = make_qkv(key, B, T, H, Hkv, D, dtype)
    cot = jax.random.normal(jax.random.fold_in(key, 1), (B, T, H, D)).astype(dtype).astype(jnp.float32)
    o, grads = run_kernel(q, k, v, cot, sliding_window=window, platform=platform, interpret=interpreter(platform), block_sizes=blocks)
    assert o.shape == q.shape and o.dtype == dtype
    low = dtype == jnp.bfloat16
    err = rel_err(o, numpy_attention(q, k, v, window))
    assert err < (1e-2 if low else 1e-5), err
    for name, a, e in zip("qkv", grads, attention_float64_grads(q, k, v, window, cot)):
        assert a.dtype == dtype
        if np.max(np.abs(e)) < 1e-12:  # softmax over a single key (window 1, T = 1): dq = dk = 0 exactly
            assert float(np.max(np.abs(np.asarray(a, np.float32)))) < 1e-5
            continue
        err = rel_err(a, e)
        # bf16: probabilities and dS enter the matmuls in bf16 (as in every flash kernel)
        assert err < (3e-2 if low else 1e-5), f"grad {name}: relative error {err:.3g}"


def test_matches_xla_path_and_dot_product_attention():
    q, k, v = make_qkv(case_key("pallas-attn-xla"), 1, 24, 2, 2, 16)
    o = attention_pallas.window_attention_pallas(q, k, v, interpret=True, block_sizes=B16)
    assert rel_err(o, attention.xla_window_attention(q, k, v)) < 1e-5
    assert rel_err(o, jax.nn.dot_product_attention(q, k, v, is_causal=True)) < 1e-5
    o_dispatch = attention.window_attention(q, k, v, sliding_window=7, backend="pallas")  # interpreted on CPU
    assert rel_err(o_dispatch, attention.xla_window_attention(q, k, v, sliding_window=7)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("platform,window", [("gpu", 7), ("tpu", None)])
def test_xla_backward_matches_references(platform, window):
    """backward="xla": the same Pallas forward, and gradients by XLA autodiff of the XLA attention (no backward
    kernels) that match jax.nn.dot_product_attention's and the float64 reference's; the public
    window_attention(backend="pallas") selects it too."""
    B, T, H, Hkv, D = 1, 40, 4, 2, 16
    key = case_key("pallas-attn-xla-backward", platform, window)
    q, k, v = make_qkv(key, B, T, H, Hkv, D)
    cot = jax.random.normal(jax.random.fold_in(key, 1), (B, T, H, D))
    kw = dict(sliding_window=window, platform=platform, interpret=interpreter(platform), block_sizes=B16)
    o, grads = run_kernel(q, k, v, cot, backward="xla", **kw)
    o_kernels, _ = run_kernel(q, k, v, cot, backward="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_kernels))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * cot)

    local = None if window is None else (window - 1, 0)
    dpa = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True, local_window_size=local)),
                   (0, 1, 2))(q, k, v)
    for name, a, d, e in zip("qkv", grads, dpa, attention_float64_grads(q, k, v, window, cot)):
        assert a.dtype == q.dtype
        assert rel_err(a, d) < 1e-5 and rel_err(a, e) < 1e-5, f"grad {name}"

    kernel_calls = {bw: str(jax.make_jaxpr(jax.grad(loss(lambda *a: attention_pallas.window_attention_pallas(
        *a, backward=bw, **kw)), (0, 1, 2)))(q, k, v)).count("pallas_call[") for bw in ("xla", "pallas")}
    assert kernel_calls == {"xla": 1, "pallas": 3}  # forward only / forward, dK/dV, dQ
    if platform == "gpu":  # the dispatcher on this CPU: the GPU kernels, interpreted
        public = jax.grad(loss(lambda *a: attention.window_attention(*a, sliding_window=window, backend="pallas",
                                                                      backward="xla")), (0, 1, 2))(q, k, v)
        for a, b in zip(public, grads):
            assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError, match="backward must be one of"):
        attention.window_attention(q, k, v, backend="pallas", backward="cudnn")


@pytest.mark.parametrize("T,window,bq,bk", [(1024, 64, 64, 64), (300, 100, 32, 64), (77, None, 16, 32),
                                            (129, 1, 64, 16), (50, 200, 16, 16)])
def test_block_skipping_ranges(T, window, bq, bk):
    """The key band of every query block (forward/dQ) and the query band of every key block (dK/dV) contain every
    unmasked pair, and a sliding window keeps the bands narrow (cost ~ T * w, not T^2)."""
    cfg = attention_blocks.Config(platform="gpu", interpret=True, scale=1.0, window=window, T=T, bq=bq, bk=bk,
                                   bq_dkv=bq, bk_dkv=bk, bq_dq=bq, bk_dq=bk, num_warps=4, num_stages=2,
                                   vmem_limit_bytes=None, precision="highest")
    Tp = -(-T // max(bq, bk)) * max(bq, bk)
    m = allowed(T, window)
    visited_fwd = np.zeros((T, T), bool)
    for qb in range(Tp // bq):
        lo, hi = attention_blocks.key_range(qb * bq, bq, bk, cfg)
        visited_fwd[qb * bq:(qb + 1) * bq, lo * bk:hi * bk] = True
    visited_bwd = np.zeros((T, T), bool)
    for kb in range(Tp // bk):
        lo, hi = attention_blocks.query_range(kb * bk, bq, bk, cfg)
        visited_bwd[lo * bq:hi * bq, kb * bk:(kb + 1) * bk] = True
    assert np.all(visited_fwd[m]) and np.all(visited_bwd[m])
    nk = attention_blocks.max_band(Tp // bq, bq, lambda s: attention_blocks.key_range(s, bq, bk, cfg))
    nq = attention_blocks.max_band(Tp // bk, bk, lambda s: attention_blocks.query_range(s, bq, bk, cfg))
    if window is not None and window < T:
        assert nk <= (bq + window - 2) // bk + 2 and nq <= (bk + window - 2) // bq + 2
    if (T, window, bq, bk) == (1024, 64, 64, 64):
        assert nk == 2 and nq == 2  # 2 of 16 key blocks per query block


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_sizes=AttentionBlockSizes(block_q=24)), "block_sizes.block_q must be a power of two"),
    (dict(block_sizes=AttentionBlockSizes(block_k_dq=8)), "block_sizes.block_k_dq must be a power of two"),
    (dict(block_sizes=AttentionBlockSizes(precision="tf32")), "block_sizes.precision"),
    (dict(block_sizes={"block_q": 64}), "block_sizes must be an AttentionBlockSizes"),
    (dict(platform="metal"), "platform must be one of"),
    (dict(platform="cpu", interpret=False), "interpret must be True"),
    (dict(sliding_window=0), "sliding_window must be None or an int >= 1"),
    (dict(backward="triton"), "backward must be one of"),
])
def test_bad_arguments_raise(kwargs, match):
    q, k, v = make_qkv(case_key("pallas-attn-bad"), 1, 8, 2, 1, 16)
    with pytest.raises(ValueError, match=match):
        attention_pallas.window_attention_pallas(q, k, v, **kwargs)


def test_bad_shapes_raise():
    q, k, v = make_qkv(case_key("pallas-attn-bad-shape"), 1, 8, 3, 2, 16)
    with pytest.raises(ValueError, match="multiple of k's head count"):
        attention_pallas.window_attention_pallas(q, k, v, interpret=True)


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sleepjax.kernels import attention, sharding
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(ks[0], (4, 24, 4, 16))
    k = jax.random.normal(ks[1], (4, 24, 2, 16))
    v = jax.random.normal(ks[2], (4, 24, 2, 16))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    ref = lambda *a: attention.xla_window_attention(*a, sliding_window=6)
    for backend, kw in (("pallas", dict(interpret=True)), ("xla", {})):
        f = sharding.sharded_window_attention(mesh, batch_axis="data", head_axis="model", backend=backend,
                                              sliding_window=6, **kw)
        o = jax.jit(f)(put(q), put(k), put(v))
        assert o.sharding.spec == P("data", None, "model")
        assert float(jnp.max(jnp.abs(o - ref(q, k, v)))) < 1e-5
        if backend != "pallas":
            continue
        grads = jax.jit(jax.grad(loss(f), (0, 1, 2)))(put(q), put(k), put(v))
        for a, e in zip(grads, jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
            assert float(jnp.max(jnp.abs(a - e))) < 1e-4
    print("SHARDED-OK")
""")


def test_sharded_mesh_runs_kernel_under_shard_map():
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "SHARDED-OK" in out.stdout, out.stderr[-3000:]
