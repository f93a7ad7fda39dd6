"""Many training steps per dispatch: `run_steps` scans a step over batches.

A training step called from Python costs a dispatch per step; for a small network
that is most of the step's time. `run_steps` traces the step once inside a
`jax.lax.scan` over the batches of a device-resident dataset, so that whole
epochs run as one compiled program.

The steps' runtime checks (e.g. a non-finite energy) are collected inside the
scan as flags, the first failure is carried through it, and the program reports
it like a training step does (see `jpc.set_step_error_timing`).
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding

from . import _jit
from ._jit import deferred_checks, error_if, lean_jit
from ._types import Array, PyTree


_DATA_NAMES = ("input", "output")


@contextlib.contextmanager
def _collecting() -> Iterator[list]:
    """Collect the check flags of `lean_jit` steps called in the current trace.

    Inside a `lax.scan` body a step's flag would otherwise become a host callback
    (`_jit._traced_check`); collected here, it becomes an array of the body.
    """
    checks: list = []
    if not _jit._COLLECT:
        yield checks
        return
    _jit._collectors.append((_jit.get_opaque_trace_state(None), checks))
    try:
        yield checks
    finally:
        _jit._collectors.pop()


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _n_examples(x: PyTree, y: PyTree) -> int:
    """The common leading size of every array in `x` and `y`."""
    sizes = {}
    for name, tree in (("x", x), ("y", y)):
        for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
            if eqx.is_array(leaf):
                where = f"{name}{jtu.keystr(path)}"
                sizes[where] = np.shape(leaf)[0] if np.ndim(leaf) else None
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(
            "`x` and `y` must hold arrays with one common leading (example) axis, "
            f"got leading sizes {sizes}."
        )
    return next(iter(sizes.values()))


def _check_args(state, x, y, batch_size, n_epochs, step_kwargs) -> int:
    """Validate the arguments of `run_steps`; returns the number of examples."""
    if not isinstance(state, dict) or not state:
        raise ValueError(
            "`state` must be a non-empty dict of the step's carried arguments (e.g. "
            "`{'model': model, 'opt_state': opt_state}`), got "
            f"{type(state).__name__}."
        )
    taken = [k for k in (*_DATA_NAMES, *state) if k in step_kwargs]
    taken += [k for k in _DATA_NAMES if k in state]
    if taken:
        raise ValueError(
            "`run_steps` passes each batch as `input=` (from `x`) and `output=` (from "
            "`y`) and the entries of `state` by name; do not also pass "
            f"{sorted(set(taken))} as keyword arguments or state entries."
        )
    _check_count("batch_size", batch_size)
    _check_count("n_epochs", n_epochs)
    n = _n_examples(x, y)
    if batch_size > n:
        raise ValueError(
            f"`batch_size` must be at most the number of examples ({n}), got "
            f"{batch_size}."
        )
    return n


def _batch_sharding(leaf: Any, batch_size: int) -> NamedSharding | None:
    """The sharding of a batch taken from `leaf` (that of `leaf`), or `None`."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.is_fully_replicated:
        return None
    n_shards = leaf.shape[0] // sharding.shard_shape(leaf.shape)[0]
    if batch_size % n_shards != 0:
        raise ValueError(
            f"The data is split over {n_shards} devices along its first axis, so "
            f"`batch_size` must be a multiple of {n_shards}, got {batch_size}."
        )
    return sharding


def _batch_indices(key, n: int, batch_size: int, n_epochs: int) -> Array:
    """`(n_epochs * n_batches, batch_size)` example indices, in order or shuffled."""
    n_batches = n // batch_size
    if key is None:
        order = jnp.broadcast_to(jnp.arange(n), (n_epochs, n))
    else:
        keys = jax.vmap(lambda e: jr.fold_in(key, e))(jnp.arange(n_epochs))
        order = jax.vmap(lambda k: jr.permutation(k, n))(keys)
    order = order[:, : n_batches * batch_size]
    return order.reshape(n_epochs * n_batches, batch_size)


def _take(tree: PyTree, shardings: tuple, idx: Array) -> PyTree:
    """The examples `idx` of every array in `tree`; `shardings` has one entry
    (`None` or the sharding to keep) per leaf of `tree`."""
    leaves, treedef = jtu.tree_flatten(tree)
    batch = []
    for leaf, sharding in zip(leaves, shardings):
        if eqx.is_array(leaf):
            leaf = jnp.take(leaf, idx, axis=0)
            if sharding is not None:
                leaf = jax.lax.with_sharding_constraint(leaf, sharding)
        batch.append(leaf)
    return jtu.tree_unflatten(treedef, batch)


def _first_failure(first: Array, code: Array) -> Array:
    return jnp.where(first == 0, code, first)


@deferred_checks  # like a training step: a failed check is raised at the next call
def _run(step, state, x, y, key, step_key, shardings, sizes, keep, step_kwargs):
    n, batch_size, n_epochs = sizes
    idx = _batch_indices(key, n, batch_size, n_epochs)
    step_keys = None if step_key is None else jr.split(step_key, idx.shape[0])
    dynamic, static = eqx.partition(state, eqx.is_array)
    x_sharding, y_sharding = shardings
    messages: list = []

    def body(carry, inputs):
        dynamic, first = carry
        batch_idx, k = inputs
        kwargs = dict(step_kwargs, output=_take(y, y_sharding, batch_idx))
        if x is not None:
            kwargs["input"] = _take(x, x_sharding, batch_idx)
        if k is not None:
            kwargs["key"] = k
        with _collecting() as checks:
            out = step(**eqx.combine(dynamic, static), **kwargs)
        messages[:] = [msg for _, msg in checks]
        carried = _carried(out, state)
        new_dynamic, new_static = eqx.partition(carried, eqx.is_array)
        _check_static(new_static, static)
        metrics = {
            name: v
            for name, v in out.items()
            if name not in state and (keep is None or name in keep)
        }
        if keep is not None and set(keep) - set(metrics):
            raise ValueError(
                f"`metrics` names results the step does not return: "
                f"{sorted(set(keep) - set(metrics))} (its results: {sorted(out)})."
            )
        first = _first_failure(first, _jit._error_code(checks))
        return (new_dynamic, first), metrics

    init = (dynamic, jnp.zeros((), jnp.int32))
    (dynamic, first), metrics = jax.lax.scan(body, init, (idx, step_keys))
    for i, msg in enumerate(messages):
        dynamic = error_if(dynamic, first == i + 1, _in_run_steps(msg))
    return eqx.combine(dynamic, static), metrics


_run.__name__ = "run_steps"  # named in the messages of failed checks
_run_jitted = lean_jit(_run)


def _carried(out: Any, state: dict) -> dict:
    if not isinstance(out, dict):
        raise ValueError(
            "`step` must return a dict (as the `jpc.make_*_step` functions do), got "
            f"{type(out).__name__}."
        )
    missing = [name for name in state if name not in out]
    if missing:
        raise ValueError(
            f"Every entry of `state` must be returned by `step` under the same name; "
            f"the step's result has no {missing} (its keys: {sorted(out)})."
        )
    return {name: out[name] for name in state}


def _check_static(new: PyTree, old: PyTree) -> None:
    if jtu.tree_structure(new) != jtu.tree_structure(old):
        raise ValueError(
            "`step` must return the entries of `state` with the structure they came "
            "in (the same modules and optimiser states), but the structure changed."
        )


def _in_run_steps(message: str) -> str:
    return (
        f"{message} (In one of the steps run by `run_steps`; the returned state "
        "and the metrics of that step and the later ones are not valid.)"
    )


def run_steps(
    step: Callable[..., dict],
    state: dict[str, PyTree],
    x: PyTree | None,
    y: PyTree,
    *,
    batch_size: int,
    key: Array | None = None,
    n_epochs: int = 1,
    step_key: Array | None = None,
    metrics: Sequence[str] | None = None,
    **step_kwargs: Any,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Run many training steps over a dataset as one compiled program.

    Equivalent to the Python loop

    ```python
    for batch in batches:  # n_epochs * (n // batch_size) of them
        out = step(**state, input=x[batch], output=y[batch], **step_kwargs)
        state = {name: out[name] for name in state}
    ```

    but the loop is a `jax.lax.scan` inside one `jax.jit`: the step is traced
    once, and the whole run is a single dispatch, which removes the per-call
    overhead that dominates small networks (see the
    [many steps per dispatch](../many_steps.md) page). The results equal the
    Python loop's to floating-point tolerance.

    Each epoch visits `n // batch_size` batches of `batch_size` examples: in
    order without `key`, else in the order of the permutation
    `jax.random.permutation(jax.random.fold_in(key, epoch), n)` (a fresh one per
    epoch). The last `n % batch_size` examples of each epoch's order are
    **dropped**, so that every batch has the same shape (with a `key` a different
    remainder is dropped each epoch).

    Works with any step that takes its data as `output=` (and `input=`) and
    returns a dict: [`jpc.make_pc_step`][], [`jpc.make_bp_step`][] and the
    variants' steps (e.g. [`jpc.make_ipc_step`][], [`jpc.make_zil_step`][],
    [`jpc.make_hpc_step`][], whose state is `generator`, `amortiser` and
    `opt_states`), or a function of your own. For data parallelism place `x` and
    `y` with [`jpc.shard_batch`][] and the state with [`jpc.replicate`][]: each
    batch keeps the data's sharding.

    **Arguments:**

    - `step`: the training step, called as
        `step(**state, input=..., output=..., **step_kwargs)`.
    - `state`: the arguments carried from one step to the next, by name, e.g.
        `{"model": model, "skip_model": None, "opt_state": opt_state}`; the step's
        result must hold each of them under the same name.
    - `x`: inputs `(n, ...)` (or a pytree of such arrays) passed as `input=`;
        `None` for unsupervised steps (no `input=` is passed).
    - `y`: targets `(n, ...)` passed as `output=`.
    - `batch_size`: examples per step.
    - `key`: PRNG key shuffling the examples; `None` (default) keeps their order.
    - `n_epochs`: passes over the data (default 1).
    - `step_key`: optional PRNG key split into one key per step, passed as
        `key=` (e.g. for the random activities of unsupervised
        [`jpc.make_pc_step`][]).
    - `metrics`: names of the step's results to keep, e.g. `("loss",)`; `None`
        (default) keeps every result that is not part of `state`. Every kept
        result is stored for every step: [`jpc.make_pc_step`][]'s `activities`
        alone are `n_steps × batch_size × Σ widths` numbers, so keep only what you
        need on long runs.
    - `**step_kwargs`: every other argument of the step (`optim=`,
        `activity_optim=`, ...). Python floats here are compiled in (a new value
        compiles again); pass a JAX scalar (`jnp.asarray(0.1)`) to trace one.

    **Returns:**

    `(state, metrics)`: the state after the last step (same keys as `state`), and
    a dict of the step's other results, each stacked along a new leading axis of
    length `n_epochs * (n // batch_size)` (one row per step, in order); metrics the
    step returns as `None` stay `None`.

    **Raises:**

    `ValueError` if `state` is not a non-empty dict, `batch_size` or `n_epochs` is
    not a positive integer, `batch_size` exceeds the number of examples or is not
    a multiple of the number of devices the data is split over, `x` and `y`
    differ in their number of examples, `input`/`output` or a state entry is also
    given in `step_kwargs`, the step does not return a dict holding every
    state entry, or `metrics` names a result the step does not return. A step's
    runtime check that fails in any step (e.g. a non-finite
    energy in [`jpc.make_pc_step`][]) raises `eqx.EquinoxRuntimeError` with the
    step's message, with the timing of training steps (by default at the next
    call of `run_steps`; see [`jpc.set_step_error_timing`][]).
    """
    n = _check_args(state, x, y, batch_size, n_epochs, step_kwargs)
    shardings = tuple(
        tuple(_batch_sharding(leaf, batch_size) for leaf in jtu.tree_leaves(tree))
        for tree in (x, y)
    )
    return _run_jitted(
        step,
        state,
        x,
        y,
        key,
        step_key,
        shardings,
        (n, batch_size, n_epochs),
        None if metrics is None else tuple(metrics),
        step_kwargs,
    )
