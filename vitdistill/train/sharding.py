"""One data-parallel mesh over every device of every process, and host batches -> global arrays."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices (all hosts on a pod): batches split along it, parameters replicated."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicated_like(tree, mesh: Mesh):
    """A replicated sharding for every leaf of `tree`."""
    rep = replicated(mesh)
    return jax.tree.map(lambda _: rep, tree)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's share of a batch into arrays split over the whole mesh."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree, mesh: Mesh):
    """Places host values (a teacher's variables, say) on every device."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def to_host(tree):
    """Fetches arrays to numpy on this process, gathering batch-split ones from every process."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)
