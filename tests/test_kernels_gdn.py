"""The gated delta rule: recurrent backend vs a float64 NumPy loop; chunked vs recurrent (values, states, grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_reference as ref
from helpers.compare import assert_trees_close, case_key, rel_err
from helpers.kernels import make_inputs
from sleepjax.kernels import gated_delta_rule, gated_delta_rule_step, unit_lower_inverse

SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


@pytest.mark.parametrize("use_delta", [True, False])
@pytest.mark.parametrize("decay,beta_range", [("normal", "normal"), ("strong", "high"), ("none", "low")])
def test_recurrent_matches_float64_loop(use_delta, decay, beta_range):
    args = make_inputs(case_key("rec", use_delta, decay, beta_range), B=1, T=23, decay=decay, beta_range=beta_range)
    o, s = gated_delta_rule(*args, use_delta=use_delta, backend="recurrent")
    o_ref, s_ref = ref.gated_delta_rule(*args, use_delta=use_delta)
    assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5


CHUNK_CASES = [
    # (T, chunk_size, Hk, Hv, Dk, Dv, decay, beta_range, with_state)
    (37, 16, 2, 4, 16, 8, "normal", "normal", True),
    (64, 64, 1, 1, 8, 8, "normal", "normal", False),
    (130, 64, 2, 2, 16, 32, "normal", "high", True),
    (75, 32, 1, 3, 8, 4, "strong", "normal", True),
    (19, 64, 2, 2, 8, 8, "none", "low", True),
    (1, 64, 1, 2, 4, 4, "normal", "high", True),
    (300, 64, 1, 1, 16, 16, "normal", "high", True),  # long: errors must not accumulate across chunks
]
FAST_CHUNK_CASES = {CHUNK_CASES[0]}  # the default run's (several chunks, grouped heads, a given state)


def _chunk_id(c):
    return "T{}-C{}-Hk{}-Hv{}-{}-{}".format(*c[:3], c[3], c[6], c[7])


@pytest.mark.parametrize("use_delta", [True, False])
@pytest.mark.parametrize("case", [c if c in FAST_CHUNK_CASES else pytest.param(c, marks=SLOW, id=_chunk_id(c))
                                  for c in CHUNK_CASES], ids=_chunk_id)
def test_chunked_matches_recurrent(use_delta, case):
    T, C, Hk, Hv, Dk, Dv, decay, beta_range, with_state = case
    args = make_inputs(case_key("chunk", use_delta, case), B=2, T=T, Hk=Hk, Hv=Hv, Dk=Dk, Dv=Dv, decay=decay,
                       beta_range=beta_range, state=with_state)
    o_ref, s_ref = gated_delta_rule(*args, use_delta=use_delta, backend="recurrent")
    o, s = gated_delta_rule(*args, use_delta=use_delta, backend="chunked", chunk_size=C)
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-4, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < 1e-4, rel_err(s, s_ref)

    # Gradients of a random linear functional of (o, final state) with respect to every input.
    kq, ks = jax.random.split(case_key("cot", case))
    o_cot, s_cot = jax.random.normal(kq, o_ref.shape), jax.random.normal(ks, s_ref.shape)
    argnums = (0, 1, 2, 3, 4, 5) if with_state else (0, 1, 2, 3, 4)

    def objective(backend):
        def f(*a):
            o, s = gated_delta_rule(*a, use_delta=use_delta, backend=backend, chunk_size=C)
            return jnp.sum(o * o_cot) + jnp.sum(s * s_cot)
        return f

    g_ref = jax.grad(objective("recurrent"), argnums)(*args)
    g = jax.grad(objective("chunked"), argnums)(*args)
    assert_trees_close(g, g_ref, 2e-4, "grad")


def test_bfloat16_inputs_keep_float32_state():
    """bf16 inputs: bf16 matmul operands with float32 accumulation (the stated precision: ~0.5% of the largest
    entry, measured 3e-3 here), float32 state."""
    args = make_inputs(case_key("bf16"), T=70, dtype=jnp.bfloat16)
    o, s = gated_delta_rule(*args, backend="chunked")
    o_ref, s_ref = ref.gated_delta_rule(*args)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < 2e-2 and rel_err(s, s_ref) < 2e-2


def _dot_operand_dtypes(jaxpr, found):
    """Operand dtype pairs and shapes of every dot_general in a jaxpr, sub-jaxprs (scan, custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple((str(v.aval.dtype), tuple(v.aval.shape)) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _dot_operand_dtypes(inner, found)
    return found


@pytest.mark.parametrize("backend", ["chunked", "pallas"])
def test_bfloat16_matmuls_take_bfloat16_operands(backend):
    """Forward and backward: every matmul outside the chunk inverse ((I + A)^-1, float32 C x C) and the Pallas
    kernels' own dots takes bf16 operands (tensor cores), none takes a mix."""
    args = make_inputs(case_key("bf16-ops"), B=1, T=40, Hk=1, Hv=1, Dk=16, Dv=32, dtype=jnp.bfloat16)
    loss = lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in gated_delta_rule(*a, backend=backend,
                                                                                        chunk_size=16))
    dots = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss, range(6)))(*args).jaxpr, [])
    pairs = {tuple(d for d, _ in ops) for ops in dots}
    assert pairs <= {("bfloat16", "bfloat16"), ("float32", "float32")}, pairs
    f32 = [ops for ops in dots if ops[0][0] == "float32"]
    # float32 dots: only the inverse's [.., s, s] blocks (s <= 16 = C here)
    assert all(shape[-1] <= 16 and shape[-2] <= 16 for ops in f32 for _, shape in ops), f32
    assert sum(ops[0][0] == "bfloat16" for ops in dots) >= 10


def test_decode_step_matches_sequence():
    q, k, v, g, beta, s0 = make_inputs(case_key("step"), T=9)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, s0, backend="recurrent")
    s = s0
    for t in range(9):
        o_t, s = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
        assert rel_err(o_t, o_ref[:, t]) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_jit_and_vmap():
    args = make_inputs(case_key("vmap"), B=2, T=20)
    fn = lambda *a: gated_delta_rule(*a, backend="chunked")
    o, s = jax.jit(fn)(*args)
    o_ref, s_ref = fn(*args)
    assert rel_err(o, o_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6
    stacked = [jnp.stack([x, 0.5 * x]) for x in args]
    ov, sv = jax.vmap(fn)(*stacked)
    o_half, _ = fn(*[0.5 * x for x in args])
    assert rel_err(ov[0], o_ref) < 1e-6 and rel_err(ov[1], o_half) < 1e-6


def test_scale_and_default_state():
    q, k, v, g, beta, _ = make_inputs(case_key("scale"), state=False)
    o1, _ = gated_delta_rule(q, k, v, g, beta, scale=0.3, backend="chunked")
    o2, _ = gated_delta_rule(q * 0.3 * 16 ** 0.5, k, v, g, beta, backend="chunked")
    assert rel_err(o1, o2) < 1e-5
    o_ref, _ = ref.gated_delta_rule(q, k, v, g, beta, None, scale=0.3)
    assert rel_err(o1, o_ref) < 1e-4


@pytest.mark.parametrize("C", [pytest.param(16, marks=SLOW), pytest.param(32, marks=SLOW), 64])
def test_unit_lower_inverse(C):
    # The matrix the chunked algorithm inverts: strictly lower beta * K K^T with unit-norm keys.
    kk, kb = jax.random.split(case_key("inv", C))
    k = jax.random.normal(kk, (3, C, 8))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    a = jnp.tril(jax.random.uniform(kb, (3, C, 1)) * (k @ jnp.swapaxes(k, -1, -2)), -1)
    t = unit_lower_inverse(a)
    eye = np.eye(C)
    assert np.max(np.abs(np.asarray(t) @ (eye + np.asarray(a)) - eye)) < 1e-4


def test_unit_lower_inverse_correlated_keys():
    """Correlated keys with beta = 1 (where Neumann-style doubling loses everything): block substitution stays
    at float32 accuracy against float64 NumPy."""
    C = 64
    rng = np.random.default_rng(7)
    k = rng.normal(size=(C, 32)) + 3.0 * rng.normal(size=(1, 32))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    a = np.tril(k @ k.T, -1)
    t = jax.jit(unit_lower_inverse)(jnp.asarray(a, jnp.float32))
    ref = np.linalg.inv(np.eye(C) + a)
    assert np.linalg.norm(np.asarray(t) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("C", [pytest.param(16, marks=SLOW), 37, pytest.param(64, marks=SLOW)])
def test_unit_lower_inverse_gradient(C):
    """The custom gradient (-T^T dT T^T on the strict lower triangle) against float64 autodiff of a dense inverse,
    with correlated keys and beta near 1 (the ill-conditioned case) and a non-power-of-two size (padded)."""
    from jax import enable_x64

    rng = np.random.default_rng(C)
    k = rng.normal(size=(2, C, 8)) + 2.0 * rng.normal(size=(2, 1, 8))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 - 1e-3 * rng.uniform(size=(2, C, 1))
    a = np.tril(beta * (k @ np.swapaxes(k, -1, -2)), -1)
    cot = rng.normal(size=a.shape)
    got = jax.jit(jax.grad(lambda x: jnp.sum(unit_lower_inverse(x) * cot)))(jnp.asarray(a, jnp.float32))
    with enable_x64():
        eye = jnp.eye(C, dtype=jnp.float64)
        # Only the strict lower triangle is an input: the diagonal and above are structurally zero.
        want = jax.grad(lambda x: jnp.sum(jnp.linalg.inv(eye + jnp.tril(x, -1)) * cot))(jnp.asarray(a, jnp.float64))
    assert rel_err(got, np.asarray(want)) < 1e-4
    assert np.all(np.asarray(got)[..., np.triu_indices(C)[0], np.triu_indices(C)[1]] == 0.0)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0][0],) + a[1:], "q must have rank 4"),
    (lambda a: (a[0], a[1][:, :, :1]) + a[2:], "k must have shape"),
    (lambda a: a[:2] + (a[2][:, :, :3],) + a[3:], "multiple of q's head count"),
    (lambda a: a[:3] + (a[3][..., :1],) + a[4:], "g must have shape"),
    (lambda a: a[:4] + (a[4][:, :5],) + a[5:], "beta must have shape"),
    (lambda a: a[:5] + (a[5][:, :1],), "initial_state must have shape"),
    (lambda a: (a[0].astype(jnp.int32),) + a[1:], "q must be a floating-point array"),
])
def test_bad_inputs_raise(mutate, match):
    args = make_inputs(case_key("bad"))
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(*mutate(args), backend="chunked")


def test_bad_backend_and_chunk():
    args = make_inputs(case_key("bad2"))
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_delta_rule(*args, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 16"):
        gated_delta_rule(*args, backend="chunked", chunk_size=24)


@pytest.mark.parametrize("use_delta", [True, pytest.param(False, marks=SLOW)])
def test_chunked_is_exact_in_float64(use_delta):
    """In float64 the chunked algorithm and its gradients agree with the recurrence to rounding (1e-10):
    the float32 differences above are rounding, not algorithm."""
    from jax import enable_x64

    with enable_x64():
        args = [None if x is None else jnp.asarray(np.asarray(x), jnp.float64)
                for x in make_inputs(case_key("f64", use_delta), T=45, decay="strong", beta_range="high")]
        f = lambda backend: lambda *a: sum(jnp.sum(jnp.sin(x)) for x in gated_delta_rule(
            *a, use_delta=use_delta, backend=backend, chunk_size=16))
        assert_trees_close(jax.grad(f("chunked"), (0, 1, 2, 3, 4, 5))(*args),
                           jax.grad(f("recurrent"), (0, 1, 2, 3, 4, 5))(*args), 1e-10, "f64 grad")


def test_xla_backend_takes_recurrent_values_and_chunked_gradients():
    args = make_inputs(case_key("xla"), T=40)
    o, s = gated_delta_rule(*args, backend="xla", chunk_size=16)
    o_rec, s_rec = gated_delta_rule(*args, backend="recurrent")
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_rec))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_rec))
    f = lambda backend: lambda *a: sum(jnp.sum(jnp.cos(x)) for x in gated_delta_rule(*a, backend=backend,
                                                                                       chunk_size=16))
    g_xla = jax.grad(f("xla"), (0, 1, 2, 3, 4, 5))(*args)
    g_chunk = jax.grad(f("chunked"), (0, 1, 2, 3, 4, 5))(*args)
    assert_trees_close(g_xla, g_chunk, 0.0, "xla grad")
    o_none, _ = gated_delta_rule(*args[:5], backend="xla")
    o_rec_none, _ = gated_delta_rule(*args[:5], backend="recurrent")
    assert rel_err(o_none, o_rec_none) == 0.0
