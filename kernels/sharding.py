"""Run the sequence mixers under a sharded mesh.

A ``pallas_call`` is opaque to the SPMD partitioner: given sharded operands it would gather them and run the
kernel replicated (or fail). Both mixers are independent across batch rows and across (key-head, value-head)
groups, so the fix is to wrap the call in ``jax.shard_map`` over the batch and head mesh axes: every device runs
the kernel on its local [B/nb, T, H/nh, D] slice, and nothing is communicated (the backward is local too).

The wrappers work for every backend (the XLA paths as well as Pallas), so model code can use one code path.
Head sharding keeps grouped heads consistent: with Hv = r Hk and both head counts split into nh equal parts,
device i holds key heads i Hk/nh ... and exactly the value heads they serve.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

from . import attention, attention_pallas, gdn, gdn_pallas

AxisName = str | tuple[str, ...] | None

# Layout strings: one character per array dim; 'b' = batch dim, 'h' = head dim, anything else = not sharded.
GDN_IN_LAYOUTS = ("bthd", "bthd", "bthd", "bth", "bth", "bhkv")
GDN_OUT_LAYOUTS = ("bthd", "bhkv")
ATTENTION_IN_LAYOUTS = ("bthd", "bthd", "bthd")
ATTENTION_OUT_LAYOUT = "bthd"


def _axis_size(mesh: Mesh, axis: AxisName) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for name in names:
        if name not in mesh.shape:
            raise ValueError(f"mesh has no axis {name!r}; its axes are {tuple(mesh.shape)}")
    return math.prod(mesh.shape[name] for name in names)


def layout_spec(layout: str, batch_axis: AxisName, head_axis: AxisName) -> P:
    """PartitionSpec for a layout string, e.g. 'bthd' -> P(batch_axis, None, head_axis, None)."""
    return P(*(batch_axis if c == "b" else head_axis if c == "h" else None for c in layout))


def _check_divisible(mesh, args, layouts, batch_axis, head_axis):
    nb, nh = _axis_size(mesh, batch_axis), _axis_size(mesh, head_axis)
    for i, (x, layout) in enumerate(zip(args, layouts)):
        if x is None:
            continue
        if x.ndim != len(layout):
            raise ValueError(f"argument {i} must have rank {len(layout)} (layout {layout!r}), got shape "
                             f"{tuple(x.shape)}")
        for dim, c, n, axis in ((layout.find("b"), "batch", nb, batch_axis), (layout.find("h"), "head", nh,
                                                                                head_axis)):
            if dim >= 0 and x.shape[dim] % n:
                raise ValueError(f"argument {i}: its {c} dim ({x.shape[dim]}) must be divisible by the size of "
                                 f"mesh axis {axis!r} ({n})")


def shard_batch_heads(fn: Callable, mesh: Mesh, *, in_layouts: Sequence[str], out_layouts, batch_axis: AxisName =
                      "data", head_axis: AxisName = None) -> Callable:
    """Wrap ``fn`` (a per-device kernel call) in ``jax.shard_map`` over the batch and head axes of ``mesh``.

    in_layouts: one layout string per positional argument (see ``layout_spec``); out_layouts: a layout string or
    a tuple of them matching ``fn``'s output. Mesh axes not named stay automatic (operands are replicated
    along them). Arguments may be None (passed through unsharded).
    """
    used = {a for axis in (batch_axis, head_axis) if axis is not None
            for a in ((axis,) if isinstance(axis, str) else axis)}
    out_specs = (layout_spec(out_layouts, batch_axis, head_axis) if isinstance(out_layouts, str)
                 else tuple(layout_spec(o, batch_axis, head_axis) for o in out_layouts))

    def wrapped(*args):
        if len(args) != len(in_layouts):
            raise ValueError(f"expected {len(in_layouts)} arguments (layouts {tuple(in_layouts)}), got {len(args)}")
        _check_divisible(mesh, args, in_layouts, batch_axis, head_axis)
        present = [i for i, x in enumerate(args) if x is not None]

        def local(*xs):
            full = [None] * len(args)
            for i, x in zip(present, xs):
                full[i] = x
            return fn(*full)

        in_specs = tuple(layout_spec(in_layouts[i], batch_axis, head_axis) for i in present)
        mapped = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=used,
                               check_vma=False)
        return mapped(*(args[i] for i in present))

    return wrapped


def sharded_gated_delta_rule(mesh: Mesh, *, batch_axis: AxisName = "data", head_axis: AxisName = None,
                             backend: str = "auto", **kwargs) -> Callable:
    """``f(q, k, v, g, beta, initial_state=None) -> (o, final_state)`` running under ``mesh``.

    backend: one of ``gdn.BACKENDS`` (resolved per device by ``gdn.gated_delta_rule``); kwargs go to the
    backend (scale, use_delta, chunk_size; with backend="pallas" also block_sizes, interpret, platform, backward).
    """
    if backend == "pallas":
        def call(q, k, v, g, beta, s0):
            return gdn_pallas.gated_delta_rule_pallas(q, k, v, g, beta, s0, **kwargs)
    else:
        def call(q, k, v, g, beta, s0):
            return gdn.gated_delta_rule(q, k, v, g, beta, s0, backend=backend, **kwargs)

    mapped = shard_batch_heads(call, mesh, in_layouts=GDN_IN_LAYOUTS, out_layouts=GDN_OUT_LAYOUTS,
                               batch_axis=batch_axis, head_axis=head_axis)

    def f(q, k, v, g, beta, initial_state=None):
        return mapped(q, k, v, g, beta, initial_state)

    return f


def sharded_window_attention(mesh: Mesh, *, batch_axis: AxisName = "data", head_axis: AxisName = None,
                             backend: str = "auto", **kwargs) -> Callable:
    """``f(q, k, v) -> o`` running under ``mesh``; backend and kwargs as for ``attention.window_attention``
    (with backend="pallas" also block_sizes, interpret, platform, backward)."""
    if backend == "pallas":
        def call(q, k, v):
            return attention_pallas.window_attention_pallas(q, k, v, **kwargs)
    else:
        def call(q, k, v):
            return attention.window_attention(q, k, v, backend=backend, **kwargs)

    return shard_batch_heads(call, mesh, in_layouts=ATTENTION_IN_LAYOUTS, out_layouts=ATTENTION_OUT_LAYOUT,
                             batch_axis=batch_axis, head_axis=head_axis)
