"""The one float32-accumulating matmul helper of the kernels, for XLA code and inside Pallas kernels alike.

``dot(spec, a, b)`` is ``einsum(spec, a, b)`` as a single ``lax.dot_general`` (plus a transpose when the output
order asks for one), so the same call lowers in XLA, Triton and Mosaic. Precision policy (``operand_dtype``):
16-bit inputs (bf16, fp16) keep 16-bit operands and accumulate in float32 (tensor cores on GPU, the MXU's native
mode on TPU); 32-bit inputs use float32 operands at ``Precision.HIGHEST`` (true float32 on every platform: no TF32
on GPU, no single bf16 pass on TPU), float64 inputs float64. ``mm`` keeps the same operand dtype in its gradient
(XLA's own transpose would multiply the float32 cotangent with the 16-bit operand in float32, off the tensor
cores).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def operand_dtype(input_dtype):
    """The matmul operand dtype for inputs of ``input_dtype``."""
    dt = jnp.dtype(input_dtype)
    return dt if dt.itemsize < 4 else jnp.result_type(jnp.float32, dt)


def accumulator_dtype(op_dtype):
    return jnp.result_type(jnp.float32, op_dtype)


def default_precision(op_dtype):
    return lax.Precision.HIGHEST if jnp.dtype(op_dtype).itemsize >= 4 else lax.Precision.DEFAULT


def dot(spec: str, a, b, op_dtype=None, *, precision=None, accumulate=None):
    """``einsum(spec, a, b)`` with float32 (float64) accumulation, as one ``lax.dot_general``.

    spec: two operands; every index in exactly two of (a, b, output) (contracted when in a and b), or in all three
    (a batch index; '...' = equal leading batch dims). op_dtype: cast both operands to it first (None: as given).
    precision: None -> ``default_precision(operand dtype)`` (HIGHEST for 32/64-bit operands, DEFAULT for 16-bit);
    the Pallas attention kernels pass their configured one. accumulate: the result dtype (None:
    ``accumulator_dtype``, i.e. float32, or float64 for float64 operands)."""
    if op_dtype is not None:
        a, b = a.astype(op_dtype), b.astype(op_dtype)
    dt = jnp.result_type(a.dtype, b.dtype)
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    nb = a.ndim - len(lhs) + 3 if "..." in lhs else 0
    batch = "".join(chr(0x3B1 + i) for i in range(nb))  # '...' -> greek letters (never in a spec)
    lhs, rhs, out = (t.replace("...", batch) for t in (lhs, rhs, out))
    batched = "".join(c for c in lhs if c in rhs and c in out)
    contracted = "".join(c for c in lhs if c in rhs and c not in out)
    free_a, free_b = "".join(c for c in lhs if c not in rhs), "".join(c for c in rhs if c not in lhs)
    if len(lhs) != a.ndim or len(rhs) != b.ndim or sorted(batched + free_a + free_b) != sorted(out):
        raise ValueError(f"dot spec {spec!r} (operand ranks {a.ndim}, {b.ndim}): every index must appear in "
                         f"exactly two of (a, b, output) or in all three")
    if batched + free_b + free_a == out:  # as jnp.einsum: (b, a) first where that order needs no transpose
        a, b, lhs, rhs, free_a, free_b = b, a, rhs, lhs, free_b, free_a
    dims = ((tuple(lhs.index(c) for c in contracted), tuple(rhs.index(c) for c in contracted)),
            (tuple(lhs.index(c) for c in batched), tuple(rhs.index(c) for c in batched)))
    result = lax.dot_general(a, b, dims, precision=default_precision(dt) if precision is None else precision,
                             preferred_element_type=accumulator_dtype(dt) if accumulate is None else accumulate)
    order = batched + free_a + free_b
    return result if order == out else jnp.transpose(result, tuple(order.index(c) for c in out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mm(spec: str, a, b, op_dtype):
    """``dot`` whose gradient uses the same operand dtype. Every index of ``spec`` must appear in exactly two of
    (a, b, output), with '...' (batch dims of equal shape) in all three."""
    return dot(spec, a, b, op_dtype)


def _mm_fwd(spec, a, b, op_dtype):
    # Zero-size arrays carry the input dtypes into the backward (residuals must be arrays).
    return dot(spec, a, b, op_dtype), (a.astype(op_dtype), b.astype(op_dtype), jnp.zeros((0,), a.dtype),
                                       jnp.zeros((0,), b.dtype))


def _mm_bwd(spec, op_dtype, res, ct):
    a, b, a_tag, b_tag = res
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    da = dot(f"{out},{rhs}->{lhs}", ct, b, op_dtype)
    db = dot(f"{lhs},{out}->{rhs}", a, ct, op_dtype)
    return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


mm.defvjp(_mm_fwd, _mm_bwd)
