"""Matmuls with an explicit operand dtype and float32 accumulation, for the chunked gated delta rule in XLA.

Precision policy (``operand_dtype``): 16-bit inputs (bf16, fp16) keep 16-bit operands and accumulate in float32
(tensor cores on GPU, the MXU's native mode on TPU); 32-bit inputs use float32 operands at
``Precision.HIGHEST`` (true float32 on every platform: no TF32 on GPU, no single bf16 pass on TPU), float64
inputs float64. ``mm`` keeps the same operand dtype in its gradient (XLA's own transpose would multiply the
float32 cotangent with the 16-bit operand in float32, off the tensor cores).
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


def precision(op_dtype):
    return lax.Precision.HIGHEST if jnp.dtype(op_dtype).itemsize >= 4 else lax.Precision.DEFAULT


def dot(spec: str, a, b, op_dtype):
    """``einsum(spec, a, b)`` with ``op_dtype`` operands and float32 (float64) accumulation."""
    return jnp.einsum(spec, a.astype(op_dtype), b.astype(op_dtype), precision=precision(op_dtype),
                      preferred_element_type=accumulator_dtype(op_dtype))


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
