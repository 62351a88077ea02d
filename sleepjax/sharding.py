"""Device meshes and shardings. Axes: ``data`` (batch), ``fsdp`` (batch + parameter shards), ``tensor`` (heads,
MLP hidden). Windows are sequential by design, so there is no sequence axis."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
            raise ValueError(f"--mesh entries must look like axis:size with axis in {MESH_AXES}, got {part!r} "
                             f"in {spec!r}")
        if int(size) == -1 and wildcard is None:
            wildcard = name
        elif int(size) < 1:
            raise ValueError(f"--mesh axis sizes must be >= 1 (or one -1), got {part!r}")
        sizes[name] = int(size)
    if wildcard:
        sizes[wildcard] = 1
        rest, known = divmod(num_devices, math.prod(sizes.values()))
        if known:
            raise ValueError(f"--mesh={spec!r}: {num_devices} devices are not divisible by the fixed axes")
        sizes[wildcard] = rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"--mesh={spec!r} uses {math.prod(sizes.values())} devices but {num_devices} are "
                         f"available: the axis sizes must multiply to the device count")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_size_per_shard(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
