"""Device meshes and parameter/batch shardings. Axes: ``data`` (batch), ``fsdp`` (batch + parameter shards),
``tensor`` (heads, MLP hidden). Windows are sequential by design, so there is no sequence axis.

(The shard_map wrappers that run the kernels on such a mesh are ``sleepjax.kernels.sharding``.)"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """``"data:2,fsdp:2,tensor:2"`` -> sizes of every axis (missing axes are 1). Empty: all devices on data.
    One axis may be ``-1`` (the remaining devices)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {axis: 1 for axis in MESH_AXES}
    if not spec:
        sizes["data"] = num_devices
        return sizes
    wildcard = None
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(f"mesh entries must look like axis:size with axis in {MESH_AXES}, got {part!r} "
                             f"in {spec!r}")
        if int(size) == -1 and wildcard is None:
            wildcard = name
        elif int(size) < 1:
            raise ValueError(f"mesh axis sizes must be >= 1 (or one -1), got {part!r}")
        sizes[name] = int(size)
    if wildcard:
        sizes[wildcard] = 1
        rest, known = divmod(num_devices, math.prod(sizes.values()))
        if known:
            raise ValueError(f"mesh={spec!r}: {num_devices} devices are not divisible by the fixed axes")
        sizes[wildcard] = rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh={spec!r} uses {math.prod(sizes.values())} devices but {num_devices} are "
                         f"available: the axis sizes must multiply to the device count")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of ``spec`` (see ``parse_mesh``) over ``devices`` (None: all of them).
    ``jax.make_mesh`` orders the devices for the topology (TPU rings and tori). The axes are Auto, as a plain
    ``Mesh``'s: shardings are given to ``jax.jit`` and propagated by the partitioner (``make_mesh`` would default
    to Explicit axes, which type every array's sharding)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_size_per_shard(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# Logical axis -> mesh axis. FSDP shards the model dimension of every weight matrix; tensor parallelism shards
# attention and GDN heads and the MLP hidden dimension. Anything else is replicated.
LOGICAL_RULES = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": None}


def spec_for(axes: tuple | None, shape: tuple, mesh: Mesh, rules=None) -> P:
    """PartitionSpec for an array of ``shape`` with logical ``axes``: a dimension is sharded only when its mesh
    axis is larger than 1 and divides it (otherwise it stays replicated, e.g. a 2-wide gate on 4 tensor shards)."""
    rules = LOGICAL_RULES if rules is None else rules
    if axes is None or len(axes) != len(shape):
        return P()
    spec = []
    for name, size in zip(axes, shape):
        axis = rules.get(name) if name else None
        spec.append(axis if axis and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None)
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, axes_at, rules=None):
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs): ``axes_at(path)`` gives a leaf's
    logical axes (None: replicated). Works for params and for optimizer states that mirror them."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(axes_at(path), tuple(leaf.shape), mesh, rules)), tree)


def check_heads(config, mesh: Mesh) -> None:
    """The mixers run per head group under shard_map: head counts must split evenly over the tensor axis."""
    n = mesh.shape["tensor"]
    names = ("attn_heads", "attn_kv_heads", "gdn_heads", "gdn_value_heads") + (
        ("jet_heads",) if "jet" in config.layers else ())
    for name in names:
        if n > 1 and getattr(config, name) % n:
            raise ValueError(f"mesh tensor:{n} must divide ModelConfig.{name} ({getattr(config, name)})")


def local_rows(sharding: NamedSharding, global_shape: tuple) -> slice:
    """The rows of a batch-sharded global array that this process holds (its devices' shards, contiguous)."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [idx[0].start or 0 for idx in indices]
    stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in indices]
    return slice(min(starts), max(stops))


def global_batch(sharding: NamedSharding, local: dict, global_batch_size: int) -> dict:
    """Assembles each process's rows into global arrays (single process: a plain device_put)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
            for k, v in local.items()}
