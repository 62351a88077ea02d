"""The GDN Pallas path (chunk-parallel XLA stages + Pallas state-scan kernels, kernels/gdn_pallas.py) in interpret
mode against independent references.

Forward: a float64 NumPy token loop. Gradients (q, k, v, g, beta, initial_state): autodiff of the recurrent
backend in float64. Both kernel sets (GPU: one program per (batch, head, value tile) walking the chunks; TPU: the
chunk axis as an "arbitrary" grid axis, run by the TPU-faithful interpreter with NaN-poisoned buffers) run
interpreted on CPU. Shapes stay tiny (interpret mode is slow).
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64
from jax.experimental.pallas import tpu as pltpu

from helpers import numpy_reference as ref
from helpers.compare import case_key, rel_err
from helpers.kernels import interpreter, make_inputs
from sleepjax.kernels import gdn, gdn_pallas
from sleepjax.kernels.gdn_pallas import GDNBlockSizes

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


def float64_grads(args, use_delta, o_cot, s_cot, argnums):
    with enable_x64():
        a64 = [None if x is None else jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32)), jnp.float64)
               for x in args]
        oc, sc = (jnp.asarray(np.asarray(x, np.float64)) for x in (o_cot, s_cot))

        def f(*a):
            o, s = gdn.gated_delta_rule(*a, use_delta=use_delta, backend="recurrent")
            return jnp.sum(o * oc) + jnp.sum(s * sc)

        return [np.asarray(x) for x in jax.grad(f, argnums)(*a64)]


def run_kernel(args, argnums, o_cot, s_cot, **kw):
    """(o, final_state, grads) of the Pallas kernel, forward and backward in one jitted call."""

    def f(*a):
        o, s = gdn_pallas.gated_delta_rule_pallas(*a, **{"interpret": True, **kw})
        return jnp.sum(o.astype(jnp.float32) * o_cot) + jnp.sum(s * s_cot), (o, s)

    (_, (o, s)), grads = jax.jit(jax.value_and_grad(f, argnums, has_aux=True))(*args)
    return o, s, grads


GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")

# (platform, T, chunk_size, Hk, Hv, Dk, Dv, decay, beta_range, with_state, dtype, use_delta, block_v)
CASES = [
    ("gpu", 40, 64, 1, 2, 32, 16, "normal", "normal", True, "float32", True, None),     # T < chunk, groups, Dk != Dv
    ("gpu", 100, 32, 2, 2, 16, 32, "normal", "normal", True, "float32", False, 16),    # 4 chunks, 2 value tiles
    ("gpu", 37, 16, 1, 1, 16, 16, "strong", "high", True, "float32", True, None),      # g ~ -10, beta ~ 1
    ("gpu", 50, 16, 1, 2, 16, 16, "normal", "low", False, "float32", True, None),      # beta ~ 0, no state
    ("gpu", 45, 16, 1, 2, 16, 32, "normal", "normal", True, "bfloat16", True, 16),     # bf16, value tiles
    ("gpu", 33, 16, 1, 1, 16, 16, "strong", "normal", True, "bfloat16", False, None),  # bf16, Hebbian rule
    ("gpu", 21, 16, 1, 1, 20, 24, "normal", "high", True, "float32", True, None),      # head dims padded
    ("gpu", 1, 64, 1, 2, 16, 16, "normal", "normal", True, "float32", True, None),     # one token
    ("tpu", 70, 32, 1, 2, 16, 32, "normal", "high", True, "float32", True, None),      # TPU grid kernels
    ("tpu", 30, 16, 2, 2, 16, 16, "strong", "low", True, "bfloat16", False, None),
]
FAST_CASES = [CASES[4], CASES[9]]  # the default run's (GPU and TPU kernels, both rules); the others run with -m slow


def _case_id(c):
    return "{}-T{}-C{}-Hk{}Hv{}-Dk{}Dv{}-{}-{}-{}-{}-{}".format(
        c[0], *c[1:7], c[7], c[8], "s0" if c[9] else "nos0", c[10], "delta" if c[11] else "hebb")


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=SLOW, id=_case_id(c)) for c in CASES],
                         ids=_case_id)
def test_kernel_matches_references(case):
    platform, T, C, Hk, Hv, Dk, Dv, decay, beta_range, with_state, dtype, use_delta, block_v = case
    dtype = jnp.dtype(dtype)
    key = case_key("pallas-gdn", case)
    args = make_inputs(key, B=1, T=T, Hk=Hk, Hv=Hv, Dk=Dk, Dv=Dv, decay=decay, beta_range=beta_range,
                       state=with_state, dtype=dtype, beta_margin=1e-3)
    k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
    o_cot = jax.random.normal(k1, (1, T, Hv, Dv)).astype(dtype).astype(jnp.float32)  # the cotangent o receives
    s_cot = jax.random.normal(k2, (1, Hv, Dk, Dv))
    argnums = (0, 1, 2, 3, 4, 5) if with_state else (0, 1, 2, 3, 4)
    o, s, grads = run_kernel(args, argnums, o_cot, s_cot, use_delta=use_delta, chunk_size=C, platform=platform, interpret=interpreter(platform),
                             block_sizes=GDNBlockSizes(block_v=block_v))

    assert o.shape == (1, T, Hv, Dv) and o.dtype == dtype
    assert s.shape == (1, Hv, Dk, Dv) and s.dtype == jnp.float32
    o_ref, s_ref = ref.gated_delta_rule(*args, use_delta=use_delta)
    # float32: true float32 matmuls (measured ~1e-7, 1e-6 for dg under strong decay). bf16: bf16 operands with
    # float32 accumulation, as on tensor cores (measured ~5e-3 of the largest entry, values and gradients).
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    assert rel_err(o, o_ref) < tol, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < tol, rel_err(s, s_ref)

    g_ref = float64_grads(args, use_delta, o_cot, s_cot, argnums)
    for i, a, e in zip(argnums, grads, g_ref):
        assert a.dtype == (args[i].dtype), (GRAD_NAMES[i], a.dtype)
        assert np.all(np.isfinite(np.asarray(a, np.float32))), GRAD_NAMES[i]
        err = rel_err(a, e)
        assert err < 2 * tol, f"grad {GRAD_NAMES[i]}: relative error {err:.3g} > {2 * tol}"


def test_xla_backward_fallback():
    """backward="xla" (autodiff of the chunked XLA path, for debugging) gives the same gradients."""
    args = make_inputs(case_key("pallas-gdn-xla-bwd"), B=1, T=12, Hk=1, Hv=1, Dk=16, Dv=16)
    o_cot = jax.random.normal(case_key("cot-o"), (1, 12, 1, 16))
    s_cot = jax.random.normal(case_key("cot-s"), (1, 1, 16, 16))
    argnums = (0, 1, 2, 3, 4, 5)
    _, _, grads = run_kernel(args, argnums, o_cot, s_cot, chunk_size=16, backward="xla")
    for name, a, e in zip(GRAD_NAMES, grads, float64_grads(args, True, o_cot, s_cot, argnums)):
        assert rel_err(a, e) < 1e-4, name


def test_public_dispatch_reaches_pallas_on_cpu():
    """gdn.gated_delta_rule(backend="pallas") runs the kernels (interpreted on a CPU-only JAX)."""
    args = make_inputs(case_key("pallas-dispatch"), B=1, T=9, Hk=1, Hv=1, Dk=16, Dv=16)
    o, s = gdn.gated_delta_rule(*args, backend="pallas")
    o_ref, s_ref = ref.gated_delta_rule(*args, use_delta=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_scan_kernels_have_two_dots_each():
    """The Pallas part is the state scan only: each kernel (forward, reverse) has exactly two matmuls (the old
    design put ~25 dependent dots per chunk on the sequential path and compiled for ~45 s per case on a GPU)."""
    args = make_inputs(case_key("pallas-gdn-dots"), B=1, T=40, Hk=1, Hv=1, Dk=16, Dv=16)

    def loss(*a):
        o, s = gdn_pallas.gated_delta_rule_pallas(*a, chunk_size=16, interpret=True)
        return jnp.sum(o) + jnp.sum(s)

    kernels = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                body = eqn.params["jaxpr"]
                kernels[eqn.params["name"]] = str(body).count("dot_general")
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(jax.grad(loss, range(6)))(*args).jaxpr)
    assert kernels == {"gdn_state_scan": 2, "gdn_state_scan_reverse": 2}, kernels


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk_size=24), "chunk_size must be a positive multiple of 16"),
    (dict(block_sizes=GDNBlockSizes(block_v=24)), "block_sizes.block_v must be a power of two"),
    (dict(block_sizes=GDNBlockSizes(block_v=64)), "block_sizes.block_v must be a power of two"),  # Dv = 32
    (dict(block_sizes=GDNBlockSizes(block_v=16), platform="tpu"), "block_v on TPU"),
    (dict(block_sizes=(64,)), "block_sizes must be a GDNBlockSizes"),
    (dict(platform="metal"), "platform must be one of"),
    (dict(platform="cpu", interpret=False), "interpret must be True"),
    (dict(backward="numpy"), "backward must be one of"),
    (dict(interpret=pltpu.InterpretParams(), platform="gpu"), "needs platform='tpu'"),
    (dict(interpret="yes"), "interpret must be None, a bool"),
])
def test_bad_arguments_raise(kwargs, match):
    args = make_inputs(case_key("pallas-bad"), B=1, T=8, Hk=1, Hv=1, Dk=16, Dv=32)
    with pytest.raises(ValueError, match=match):
        gdn_pallas.gated_delta_rule_pallas(*args, **kwargs)


def test_bad_shapes_raise_before_any_kernel():
    q, k, v, g, beta, s0 = make_inputs(case_key("pallas-bad-shape"), B=1, T=8, Hk=2, Hv=2, Dk=16, Dv=16)
    with pytest.raises(ValueError, match="multiple of q's head count"):
        gdn_pallas.gated_delta_rule_pallas(q, k, v[:, :, :1], g[:, :, :1], beta[:, :, :1], None, interpret=True)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gdn_pallas.gated_delta_rule_pallas(q, k, v, g, beta, s0[:, :1], interpret=True)


def test_kernel_chunk_size():
    assert [gdn_pallas.kernel_chunk_size(c) for c in (16, 32, 48, 64, 80, 96, 128, 256)] == [
        16, 32, 32, 64, 64, 64, 128, 128]


def test_block_sizes_dataclass():
    bs = GDNBlockSizes.get_default("tpu", 256)
    assert bs.block_v == 128 and GDNBlockSizes.get_default("gpu", 32).block_v == 32
    with pytest.raises(Exception):
        bs.block_v = 64  # frozen


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sleepjax.kernels import gdn, sharding
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    B, T, Hk, Hv, D = 2, 20, 4, 8, 16
    q = jax.random.normal(ks[0], (B, T, Hk, D))
    k = jax.random.normal(ks[1], (B, T, Hk, D)); k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, Hv, D))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)))
    beta = jax.random.uniform(ks[4], (B, T, Hv))
    s0 = jax.random.normal(ks[5], (B, Hv, D, D))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = (put(q, "data", None, "model"), put(k, "data", None, "model"), put(v, "data", None, "model"),
            put(g, "data", None, "model"), put(beta, "data", None, "model"), put(s0, "data", "model"))
    loss = lambda f: lambda *a: sum(jnp.sum(jnp.sin(x)) for x in f(*a))
    ref = gdn.gated_delta_rule(q, k, v, g, beta, s0, backend="recurrent")
    g_ref = jax.grad(loss(lambda *a: gdn.gated_delta_rule(*a, backend="recurrent")), range(6))(q, k, v, g, beta, s0)
    for backend, kw in (("pallas", dict(interpret=True, chunk_size=16)), ("chunked", dict(chunk_size=16))):
        f = sharding.sharded_gated_delta_rule(mesh, batch_axis="data", head_axis="model", backend=backend, **kw)
        o, s = jax.jit(f)(*args)
        assert o.sharding.spec == P("data", None, "model"), o.sharding.spec
        assert float(jnp.max(jnp.abs(o - ref[0]))) < 1e-4 and float(jnp.max(jnp.abs(s - ref[1]))) < 1e-4
        if backend != "pallas":  # the XLA path: forward is enough here (its gradients are tested elsewhere)
            continue
        grads = jax.jit(jax.grad(loss(f), range(6)))(*args)
        for a, e in zip(grads, g_ref):
            assert float(jnp.max(jnp.abs(a - e)) / jnp.max(jnp.abs(e))) < 1e-4
    print("SHARDED-OK")
""")


def test_sharded_mesh_runs_kernel_under_shard_map():
    """8 simulated CPU devices (XLA_FLAGS must precede the jax import: a fresh interpreter), batch x heads mesh;
    the Pallas kernel and the chunked XLA path, forward and gradients, against the unsharded recurrence."""
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "SHARDED-OK" in out.stdout, out.stderr[-3000:]
