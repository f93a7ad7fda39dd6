"""A low-overhead `eqx.filter_jit` for the library's jitted entry points.

`eqx.filter_jit` flattens every argument on every call, and flattening an Equinox
module runs Python code per module; for a small network that costs more than
the compiled step itself. `lean_jit` keeps the semantics (arrays traced,
every other leaf static, runtime errors raised at the call) and cuts the
per-call work:

- every Equinox module in the arguments is flattened once and remembered by
  identity (modules are immutable), so the model and optimiser state returned by
  one step are not flattened again when they are passed to the next;
- the compiled program is found by a dictionary lookup on the static part and
  called through `jax.jit`'s C++ dispatch with a flat list of arrays.

Modules holding a mutable container (a `list` or `dict` field) are never
remembered: they are flattened on every call.
"""

import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


_DYNAMIC = object()  # marks an array leaf in a tuple of static leaves
_ARRAY, _MODULE, _OTHER = 0, 1, 2
_kinds: dict = {}  # type -> _ARRAY, _MODULE or _OTHER
_JIT_CACHE_SIZE = 64  # compiled variants kept per jitted function
_MAX_STRUCTURES = 4096
_EQX_ERROR = "_EquinoxRuntimeError: "


class _Static:
    """Pytree node without children: carries static outputs through `jax.jit`."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


jtu.register_pytree_node(_Static, lambda s: ((), s.value), lambda v, _: _Static(v))


def _immutable(treedef: Any) -> bool:
    """Whether a pytree structure contains only tuples, `None` and Equinox modules."""
    data = treedef.node_data()
    if data is not None and not issubclass(data[0], (tuple, type(None), eqx.Module)):
        return False
    return all(_immutable(child) for child in treedef.children())


class _Structure:
    """The flattening of one module: treedef, static leaves, number of arrays."""

    __slots__ = ("treedef", "static", "n_arrays", "cacheable")

    def __init__(self, treedef: Any, static: tuple, cacheable: bool):
        self.treedef = treedef
        self.static = static
        self.n_arrays = sum(leaf is _DYNAMIC for leaf in static)
        self.cacheable = cacheable

    def build(self, arrays: Iterator) -> tuple[Any, list]:
        taken = [next(arrays) for _ in range(self.n_arrays)]
        module = jtu.tree_unflatten(self.treedef, _merge(taken, self.static))
        return module, taken


_structures: dict = {}  # (treedef, static leaves) -> _Structure, so keys hash fast
_modules: dict = {}  # id(module) -> (weakref, _Structure, arrays)


def _structure(treedef: Any, static: tuple) -> _Structure:
    try:
        found = _structures.get((treedef, static))
    except TypeError:  # an unhashable static leaf: never cached
        return _Structure(treedef, static, cacheable=False)
    if found is None:
        if len(_structures) >= _MAX_STRUCTURES:
            _structures.clear()
        found = _structures[(treedef, static)] = _Structure(
            treedef, static, _immutable(treedef)
        )
    return found


def _kind(leaf: Any) -> int:
    """`_ARRAY`, `_MODULE` or `_OTHER`, cached per type (ABC `isinstance` is slow)."""
    cls = type(leaf)
    kind = _kinds.get(cls)
    if kind is None:
        kind = _kinds[cls] = (
            _ARRAY if eqx.is_array(leaf) else _MODULE if _is_module(leaf) else _OTHER
        )
    return kind


def _split(leaves: list) -> tuple[list, tuple]:
    """Arrays (traced) and the static leaves, with `_DYNAMIC` where arrays were."""
    kinds = [_kind(leaf) for leaf in leaves]
    arrays = [leaf for leaf, k in zip(leaves, kinds) if k == _ARRAY]
    static = tuple(_DYNAMIC if k == _ARRAY else x for x, k in zip(leaves, kinds))
    return arrays, static


def _merge(arrays: list, static: tuple) -> list:
    it = iter(arrays)
    return [next(it) if leaf is _DYNAMIC else leaf for leaf in static]


class _Ref(weakref.ref):
    """Weak reference to a remembered module that knows its key in `_modules`."""

    __slots__ = ("key",)


def _forget(ref: _Ref) -> None:
    entry = _modules.get(ref.key)
    if entry is not None and entry[0] is ref:
        del _modules[ref.key]


def _remember(module: Any, structure: _Structure, arrays: list) -> None:
    """Remember the arrays of `module` (which must hold no tracer) by identity."""
    if not structure.cacheable:
        return
    try:
        ref = _Ref(module, _forget)
    except TypeError:
        return
    ref.key = key = id(module)
    _modules[key] = (ref, structure, arrays)


def _module_leaves(module: Any) -> tuple[_Structure, list]:
    entry = _modules.get(id(module))
    if entry is not None and entry[0]() is module:
        return entry[1], entry[2]
    leaves, treedef = jtu.tree_flatten(module)
    arrays, static = _split(leaves)
    structure = _structure(treedef, static)
    if not any(isinstance(a, jax.core.Tracer) for a in arrays):
        _remember(module, structure, arrays)
    return structure, arrays


def _is_module(node: Any) -> bool:
    return isinstance(node, eqx.Module)


def _is_module_node(node: Any) -> bool:
    return _kind(node) == _MODULE


def flatten(tree: Any) -> tuple[Any, tuple, list]:
    """`(treedef, slots, arrays)`: modules are leaves of `treedef` whose slot is
    their `_Structure`; array slots are `_DYNAMIC`; other slots hold the leaf."""
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=_is_module_node)
    slots, arrays = [], []
    for leaf in leaves:
        kind = _kind(leaf)
        if kind == _MODULE:
            structure, module_arrays = _module_leaves(leaf)
            slots.append(structure)
            arrays.extend(module_arrays)
        elif kind == _ARRAY:
            slots.append(_DYNAMIC)
            arrays.append(leaf)
        else:
            slots.append(leaf)
    return treedef, tuple(slots), arrays


def unflatten(treedef: Any, slots: tuple, arrays: list, remember: bool) -> Any:
    """Inverse of `flatten`; with `remember`, rebuilt modules are remembered."""
    it = iter(arrays)
    leaves = []
    for slot in slots:
        if slot is _DYNAMIC:
            leaves.append(next(it))
        elif type(slot) is _Structure:
            module, module_arrays = slot.build(it)
            if remember:
                _remember(module, slot, module_arrays)
            leaves.append(module)
        else:
            leaves.append(slot)
    return jtu.tree_unflatten(treedef, leaves)


def _traceable(fn: Callable, treedef: Any, slots: tuple) -> Callable:
    def traced(arrays):
        args, kwargs = unflatten(treedef, slots, arrays, remember=False)
        out_def, out_slots, out_arrays = flatten(fn(*args, **kwargs))
        return out_arrays, _Static((out_def, out_slots))

    traced.__name__ = getattr(fn, "__name__", "jpc_step")
    return traced


_callback_logger = logging.getLogger("jax._src.callback")


def _quiet_callback_failure(record: logging.LogRecord) -> bool:
    """Drop JAX's log of a failed callback: the error is raised with its message."""
    return record.getMessage() != "jax.pure_callback failed"


def _raise_runtime_error(err: Exception) -> None:
    """Re-raise an `eqx.error_if` failure as `eqx.EquinoxRuntimeError(message)`."""
    text = str(err)
    if _EQX_ERROR not in text:
        raise err
    message = text.split(_EQX_ERROR, 1)[1].split("\n\n", 1)[0].strip()
    raise eqx.EquinoxRuntimeError(message) from None


def lean_jit(fn: Callable) -> Callable:
    """`eqx.filter_jit(fn)` with a small per-call cost.

    Arrays (JAX or NumPy) are traced and every other leaf is static, as in
    `eqx.filter_jit`; like it, each call waits for its result so that an
    `eqx.error_if` failure is raised at the call, as `eqx.EquinoxRuntimeError`.
    """
    cache: dict = {}

    @functools.wraps(fn)
    def jitted(*args, **kwargs):
        treedef, slots, arrays = flatten((args, kwargs))
        key = (treedef, slots)
        compiled = cache.get(key)
        if compiled is None:
            if len(cache) >= _JIT_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            compiled = cache[key] = jax.jit(_traceable(fn, treedef, slots))
        _callback_logger.addFilter(_quiet_callback_failure)
        try:
            out_arrays, out_static = compiled(arrays)
            concrete = bool(out_arrays) and not isinstance(
                out_arrays[0], jax.core.Tracer
            )
            if concrete:
                out_arrays[0].block_until_ready()
        except (jax.errors.JaxRuntimeError, ValueError) as err:
            _raise_runtime_error(err)
        finally:
            _callback_logger.removeFilter(_quiet_callback_failure)
        out_def, out_slots = out_static.value
        return unflatten(out_def, out_slots, out_arrays, remember=concrete)

    return jitted


def error_if(tree: Any, pred: Any, msg: str) -> Any:
    """`eqx.error_if(tree, pred, msg)` whose host check sees only a scalar.

    `eqx.error_if` routes `tree` itself through a host callback, which makes the
    SPMD partitioner gather every array of `tree` onto one device. Here the check
    runs on a scalar and `tree` is returned bitwise unchanged, through a select on
    that scalar that keeps the check in the program (with `EQX_ON_ERROR=nan` the
    floating-point arrays become NaN, as with `eqx.error_if`).
    """
    flag = eqx.error_if(jnp.zeros(()), pred, msg)

    def keep(leaf):
        if eqx.is_inexact_array(leaf):
            return jnp.where(flag == 0, leaf, jnp.nan)
        return leaf

    return jtu.tree_map(keep, tree)
