"""The device mesh, the shardings of the state and the batches, and host values <-> global arrays.

The mesh has two axes, `data` and `fsdp` (`config.mesh` gives their sizes; -1 takes the remaining
devices). Batches split over both. Parameters, optimiser state, DINO's teacher and DeiT's frozen
teacher are fully sharded over `fsdp`: each array of at least `FSDP_MIN_SIZE` elements is split
along its largest dimension that `fsdp` divides; smaller arrays (biases, norms, scalars) and arrays
with no such dimension are replicated. With `fsdp = 1` everything is replicated (data parallel).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitdistill.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch dimension splits over every device
FSDP_MIN_SIZE = 2 ** 12  # elements; smaller arrays stay replicated (the all-gather would cost more than they save)
DEFAULT_MESH = {DATA_AXIS: -1, FSDP_AXIS: 1}


def mesh_shape(mesh_config: Optional[Mapping[str, int]], num_devices: int) -> dict:
    """Axis sizes for `num_devices` devices: `mesh_config`'s, with a -1 resolved to the remaining devices."""
    sizes = dict(DEFAULT_MESH if mesh_config is None else mesh_config)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"config.mesh has no axis {', '.join(map(repr, unknown))}; its axes are "
                          f"{', '.join(MESH_AXES)} (e.g. --config.mesh.fsdp=8)")
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ConfigError(f"config.mesh={sizes}: each axis needs a positive size, or -1 for one axis to take the "
                          "remaining devices")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh={sizes}: {num_devices} devices are not a multiple of {fixed}; "
                              f"pick sizes whose product divides {num_devices}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"config.mesh={sizes} covers {fixed} devices, but there are {num_devices}; make the product "
                          f"{num_devices}, or set one axis to -1")
    return sizes


def make_mesh(mesh_config: Optional[Mapping[str, int]] = None) -> Mesh:
    """The (data, fsdp) mesh over every device of every process, in `jax.devices()` order (process-major, so
    each process's devices hold a contiguous block of every batch)."""
    sizes = mesh_shape(mesh_config, jax.device_count())
    devices = np.asarray(jax.devices()).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(devices, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, fsdp: int) -> P:
    """The partition of one array: its largest dimension divisible by `fsdp` over the fsdp axis, if the array
    has at least FSDP_MIN_SIZE elements (ties: the first such dimension); else replicated."""
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return P()
    candidates = [(size, -index) for index, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, negative_index = max(candidates)
    spec = [None] * len(shape)
    spec[-negative_index] = FSDP_AXIS
    return P(*spec)


def state_shardings(tree, mesh: Mesh):
    """The shardings of a state (or any tree of arrays / ShapeDtypeStructs): fsdp_spec for every leaf."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp)), tree)


def place(tree, shardings):
    """Host values (a teacher's variables, pretrained weights), the same on every process, as global arrays
    with the given shardings; each device receives only its shard."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's share of a batch into arrays split over the whole mesh."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def place_sharded(tree, mesh: Mesh):
    """Host values placed as a state would be (`state_shardings`): DeiT's teacher, for training and evaluation."""
    return place(tree, state_shardings(tree, mesh))


def to_host(tree):
    """Fetches arrays to numpy on this process, gathering the shards other processes hold."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def per_device_bytes(tree, shardings) -> int:
    """Bytes of `tree` (arrays or ShapeDtypeStructs) that its most loaded device holds under `shardings`."""
    totals = {}
    for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        itemsize = np.dtype(x.dtype).itemsize
        for device, index in sharding.devices_indices_map(tuple(np.shape(x))).items():
            elements = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, np.shape(x)))
            totals[device] = totals.get(device, 0) + elements * itemsize
    return max(totals.values()) if totals else 0
