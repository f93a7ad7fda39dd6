"""Data parallelism on a device mesh: shard the batch, replicate the rest.

The jitted steps need no change: given arrays placed by these helpers, `jax.jit`
partitions the program over the mesh (SPMD) and inserts the all-reduces that the
batch means and parameter gradients need.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._types import PyTree


def make_data_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = "batch"
) -> Mesh:
    """A one-dimensional device mesh for data parallelism.

    **Arguments:**

    - `devices`: the devices to use; by default every device of every process
        (`jax.devices()`), so on several hosts (after
        `jax.distributed.initialize()`) the mesh spans all of them.
    - `axis_name`: name of the mesh axis the batch is split over.

    **Returns:**

    A `jax.sharding.Mesh` with one axis `axis_name`.

    **Raises:**

    `ValueError` if `devices` is empty.
    """
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 0:
        raise ValueError("`devices` must contain at least one device, got none.")
    return Mesh(np.asarray(devices), (axis_name,))


def _place(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Put every array leaf of `tree` on `sharding`; other leaves are unchanged.

    With several processes each one passes its own data: its slice of the batch
    for a sharded placement, the (identical) full value for a replicated one.
    """

    def put(leaf):
        if not eqx.is_array(leaf):
            return leaf
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jtu.tree_map(put, tree)


def _axis(mesh: Mesh, axis_name: str | None) -> str:
    if axis_name is None:
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name` must be one of the mesh axes {tuple(mesh.axis_names)}, "
            f"got {axis_name!r}."
        )
    return axis_name


def shard_batch(tree: PyTree, mesh: Mesh, axis_name: str | None = None) -> PyTree:
    """Split the leading (batch) axis of every array in `tree` over `mesh`.

    Use it for `input`, `output` and anything else with a batch axis (e.g.
    activities). With several processes, each passes its local part of the
    batch; the global batch is their concatenation in process order.

    **Arguments:**

    - `tree`: an array or any pytree of arrays with a leading batch axis;
        non-array leaves are returned unchanged.
    - `mesh`: the mesh, e.g. from [`jpc.make_data_mesh`][].
    - `axis_name`: the mesh axis to split over (default: the mesh's first axis).

    **Returns:**

    `tree` with each array placed as a `jax.Array` sharded along its first axis.

    **Raises:**

    `ValueError` if an array has no batch axis or a batch size that is not a
    multiple of the number of devices along the axis, or if `axis_name` is not
    an axis of `mesh`.
    """
    axis = _axis(mesh, axis_name)
    n_shards = mesh.shape[axis] // jax.process_count()
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        if not eqx.is_array(leaf):
            continue
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n_shards != 0:
            raise ValueError(
                f"`shard_batch` splits the leading axis over {n_shards} devices; the "
                f"array at {jtu.keystr(path) or 'the root'} has shape "
                f"{np.shape(leaf)}, whose batch size is not a multiple of it."
            )
    return _place(tree, NamedSharding(mesh, PartitionSpec(axis)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a full copy of every array in `tree` on every device of `mesh`.

    Use it for the model, the skip model and the optimiser state. Non-array
    leaves (activation functions, `None`) are returned unchanged.

    **Arguments:**

    - `tree`: any pytree, e.g. `model` or `(model, opt_state)`.
    - `mesh`: the mesh, e.g. from [`jpc.make_data_mesh`][].

    **Returns:**

    `tree` with each array replicated over the mesh.
    """
    return _place(tree, NamedSharding(mesh, PartitionSpec()))
