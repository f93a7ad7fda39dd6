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
  called through `jax.jit`'s C++ dispatch with a flat list of arrays;
- the call waits for its result only when it must: when the program contains a
  host callback (an `eqx.error_if` check with `EQX_ON_ERROR=raise`), so that a
  failed check is raised at the call as with `eqx.filter_jit`. Other programs
  are dispatched asynchronously, as with `jax.jit`, so that the Python work of
  the next call overlaps with this one's computation. The outputs are rebuilt
  while the program runs, before waiting.
- the library's own runtime checks (`error_if` below) add no host callback to
  the program: each check becomes a flag, returned as one extra integer output
  (the index of the first failed check), which the call inspects. A program with a
  host callback is run synchronously by JAX's CPU client, so a callback, even one
  that never fires, would stop asynchronous dispatch. Training steps (functions
  marked with `deferred_checks`) inspect the flag of a call at the *next* call by
  default (`set_step_error_timing`), so they never wait; other functions wait for
  the flag and raise at the call.

Modules holding a mutable container (a `list` or `dict` field) are never
remembered: they are flattened on every call. Static leaves must be hashable, as
in `eqx.filter_jit`; an unhashable one raises a `ValueError` (it would otherwise
mean a new compilation on every call).
"""

import atexit
import inspect
import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


try:  # jax >= 0.10
    from jax.extend.core import get_opaque_trace_state, jaxprs_in_params
except ImportError:  # jax 0.5 to 0.9
    from jax.core import get_opaque_trace_state, jaxprs_in_params

from ._present import check_spellings, present, wrong_spellings


_DYNAMIC = object()  # marks an array leaf in a tuple of static leaves
_ARRAY, _MODULE, _OTHER = 0, 1, 2
_kinds: dict = {}  # type -> _ARRAY, _MODULE or _OTHER
_JIT_CACHE_SIZE = 64  # compiled variants kept per jitted function
_MAX_STRUCTURES = 4096
_EQX_ERROR = "_EquinoxRuntimeError: "
# Equinox reads the same variable when it is imported. With "nan" or "off" a check
# never raises, so no call has to wait for its result.
_CHECKS_RAISE = os.environ.get("EQX_ON_ERROR", "raise") in ("raise", "breakpoint")
# With "raise", `error_if` inside a `lean_jit` trace becomes a flag output.
_COLLECT = os.environ.get("EQX_ON_ERROR", "raise") == "raise"
_TIMINGS = ("next_call", "call")
_timing = {"when": "next_call"}  # see `set_step_error_timing`
_collectors: list = []  # stack of (trace state, [(pred, message), ...])
_pending: dict = {}  # deferred-check function -> (code array, messages, name)


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
    """The flattening of one module: treedef, static leaves, number of arrays.

    Compared and hashed by content (the hash is computed once), so two equal
    flattenings are the same key of a compiled program even if they are distinct
    objects (e.g. after `_structures` was cleared).
    """

    __slots__ = ("treedef", "static", "n_arrays", "cacheable", "_hash")

    def __init__(self, treedef: Any, static: tuple, cacheable: bool, hash_: int):
        self.treedef = treedef
        self.static = static
        self.n_arrays = sum(leaf is _DYNAMIC for leaf in static)
        self.cacheable = cacheable
        self._hash = hash_

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: Any) -> bool:
        return self is other or (
            type(other) is _Structure
            and self._hash == other._hash
            and self.treedef == other.treedef
            and self.static == other.static
        )

    def build(self, arrays: Iterator) -> tuple[Any, list]:
        taken = [next(arrays) for _ in range(self.n_arrays)]
        module = jtu.tree_unflatten(self.treedef, _merge(taken, self.static))
        return module, taken


_structures: dict = {}  # (treedef, static leaves) -> _Structure, so keys hash fast
_modules: dict = {}  # id(module) -> (weakref, _Structure, arrays)


def _unhashable(what: Any, err: TypeError) -> ValueError:
    return ValueError(
        "Non-hashable static arguments are not supported (as in `eqx.filter_jit`): "
        f"every non-array leaf is part of the compiled program's key. {err} "
        f"(in {type(what).__name__})."
    )


def _structure(treedef: Any, static: tuple, module: Any) -> _Structure:
    key = (treedef, static)
    try:
        found = _structures.get(key)
    except TypeError as err:
        raise _unhashable(module, err) from None
    if found is None:
        if len(_structures) >= _MAX_STRUCTURES:
            _structures.clear()
        found = _structures[key] = _Structure(
            treedef, static, _immutable(treedef), hash(key)
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
    structure = _structure(treedef, static, module)
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


def unflatten(treedef: Any, slots: tuple, arrays: list) -> Any:
    """Inverse of `flatten` (used on the traced arguments; call outputs are rebuilt
    by `_Rebuild`)."""
    it = iter(arrays)
    leaves = []
    for slot in slots:
        if slot is _DYNAMIC:
            leaves.append(next(it))
        elif type(slot) is _Structure:
            leaves.append(slot.build(it)[0])
        else:
            leaves.append(slot)
    return jtu.tree_unflatten(treedef, leaves)


_GETTERS = {
    jtu.SequenceKey: lambda key: lambda node: node[key.idx],
    jtu.DictKey: lambda key: lambda node: node[key.key],
    jtu.GetAttrKey: lambda key: lambda node: getattr(node, key.name),
}


def _getter(path: tuple) -> Callable | None:
    """A function fetching the node at `path` (a key path), or `None` if a key is
    of a kind that cannot be followed (e.g. a custom node's flattened index)."""
    steps = []
    for key in path:
        make = _GETTERS.get(type(key))
        if make is None:
            return None
        steps.append(make(key))

    def get(node):
        for step in steps:
            node = step(node)
        return node

    return get


class _Rebuild:
    """How to rebuild a call's output from the program's flat output arrays.

    The whole output is rebuilt by one `tree_unflatten` (JAX's C++ traversal),
    then each cacheable Equinox module in it is fetched by its key path and
    remembered with its arrays, so that passing it back in the next call (a
    model, an optimiser state) skips its flattening.
    """

    __slots__ = ("treedef", "template", "modules")

    def __init__(self, out: Any, slots: tuple):
        leaves, self.treedef = jtu.tree_flatten(out)
        self.template = tuple(
            _DYNAMIC
            if _kind(leaf) == _ARRAY or isinstance(leaf, jax.core.Tracer)
            else leaf
            for leaf in leaves
        )
        paths = jtu.tree_flatten_with_path(out, is_leaf=_is_module_node)[0]
        self.modules = []
        start = 0
        for (path, _), slot in zip(paths, slots):
            if type(slot) is _Structure:
                get = _getter(path)
                if slot.cacheable and get is not None:
                    self.modules.append((get, slot, start, start + slot.n_arrays))
                start += slot.n_arrays
            elif slot is _DYNAMIC:
                start += 1

    def __call__(self, arrays: list, remember: bool) -> Any:
        out = jtu.tree_unflatten(self.treedef, _merge(arrays, self.template))
        if remember:
            for get, structure, start, stop in self.modules:
                _remember(get(out), structure, arrays[start:stop])
        return out


def _traceable(fn: Callable, treedef: Any, slots: tuple) -> Callable:
    def traced(arrays):
        checks: list = []
        _collectors.append((get_opaque_trace_state(None), checks))
        try:
            args, kwargs = unflatten(treedef, slots, arrays)
            out = fn(*args, **kwargs)
            _, out_slots, out_arrays = flatten(out)
            rebuild = _Rebuild(out, out_slots)
        finally:
            _collectors.pop()
        messages = tuple(msg for _, msg in checks)
        if checks:
            out_arrays = [*out_arrays, _error_code(checks)]
        return out_arrays, _Static((rebuild, messages))

    traced.__name__ = getattr(fn, "__name__", "jpc_step")
    return traced


def _has_callback(jaxpr: Any) -> bool:
    """Whether a jaxpr (or one nested in it) calls back to the host."""
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return True
        if any(_has_callback(sub) for sub in jaxprs_in_params(eqn.params)):
            return True
    return False


def _must_wait(compiled: Any, arrays: list) -> bool:
    """Whether calls of `compiled` wait for their result (see the module doc).

    Traces `compiled` (`jax.jit` keeps the trace, so the call that follows does not
    trace again) and looks for a host callback in the program.
    """
    if not _CHECKS_RAISE:
        return False
    return _has_callback(compiled.trace(arrays).jaxpr.jaxpr)


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


def _error_code(checks: list) -> jax.Array:
    """`int32` scalar: 0 if no check failed, else 1 + index of the first failure."""
    code = jnp.zeros((), jnp.int32)
    for i in reversed(range(len(checks))):
        code = jnp.where(jnp.any(checks[i][0]), jnp.int32(i + 1), code)
    return code


def _collector() -> list | None:
    """The checks list of the `lean_jit` trace we are directly in, else `None`."""
    if not _COLLECT or not _collectors:
        return None
    state, checks = _collectors[-1]
    return checks if get_opaque_trace_state(None) == state else None


def _check_code(code: Any, messages: tuple, name: str, previous: bool) -> None:
    """Raise `eqx.EquinoxRuntimeError` if `code` (waited for) flags a failure."""
    # `np.asarray` first: `int()` of a JAX array takes a slow path (tens of µs).
    index = int(np.asarray(code))
    if index == 0:
        return
    message = messages[index - 1]
    if previous:
        message += (
            f" (This check failed in the previous call of `{name}`, whose results "
            "are not valid; training steps report a failed check at the next call. "
            'Call `jpc.set_step_error_timing("call")` to raise at the failing call.)'
        )
    raise eqx.EquinoxRuntimeError(message)


def _traced_check(out_arrays: list, code: Any, messages: tuple) -> list:
    """Under an outer trace: pass the flag on, or check it in the program."""
    checks = _collector()
    if checks is not None:  # an enclosing `lean_jit` trace reports it
        checks.extend((code == i + 1, msg) for i, msg in enumerate(messages))
        return out_arrays
    flag = eqx.branched_error_if(
        jnp.zeros(()), code > 0, jnp.maximum(code - 1, 0), messages
    )
    return [
        jnp.where(flag == 0, a, jnp.nan) if eqx.is_inexact_array(a) else a
        for a in out_arrays
    ]


def set_step_error_timing(when: str) -> str:
    """Choose when a training step reports a failed runtime check.

    [`jpc.make_pc_step`][] checks that the energy at the inferred activities is
    finite (and, on the ODE path, that the solve succeeded). Waiting for that
    check at every call would stop JAX's asynchronous dispatch: the Python work
    of the next call could no longer overlap with this step, which matters most
    for small networks and on accelerators. So by default (`"next_call"`) a call
    returns at once, and a failed check is raised as `eqx.EquinoxRuntimeError`
    at the **next** call of the same function, before that call returns (its
    message says so); the failing call's results are not valid (e.g. NaN).
    Call [`jpc.raise_pending_step_errors`][] to report the last call's check
    without another step, e.g. at the end of training.

    With `"call"`, every call waits for its check and raises at the failing
    call, like `eqx.filter_jit`. Functions other than training steps (e.g.
    [`jpc.solve_inference`][]) always raise at the call. With the environment
    variable `EQX_ON_ERROR=nan` (read by Equinox at import) a failed check
    gives NaN results instead, and no call waits.

    **Arguments:**

    - `when`: `"next_call"` (the default setting) or `"call"`.

    **Returns:**

    The previous setting, so that it can be restored.

    **Raises:**

    `ValueError` if `when` is neither `"next_call"` nor `"call"`.
    """
    if not isinstance(when, str) or when not in _TIMINGS:
        raise ValueError(f'`when` must be "next_call" or "call", got {when!r}.')
    previous, _timing["when"] = _timing["when"], when
    return previous


def raise_pending_step_errors() -> None:
    """Report the runtime check of the last call of each training step now.

    With the default timing of [`jpc.set_step_error_timing`][] a failed check
    of a training step is raised at its next call; this waits for the last
    call of every training step and raises its failed check, if any.

    **Raises:**

    `eqx.EquinoxRuntimeError` with the check's message if the last call of a
    training step failed its check (reported once).
    """
    while _pending:
        _, (code, messages, name) = _pending.popitem()
        _check_code(code, messages, name, previous=True)


def _report_pending_at_exit() -> None:
    """At interpreter exit, print the failed checks that were never reported.

    A training step's failed check is raised at its next call; after the last
    call of a run there is none, so without this hook a diverged final step
    would pass silently. Printed to `sys.stderr` (a warning could be filtered
    out); registered after JAX's own exit hook, so it runs before JAX shuts down.
    """
    while _pending:
        _, (code, messages, name) = _pending.popitem()
        try:
            index = int(np.asarray(code))
        except Exception:  # the runtime is already gone: nothing left to report
            continue
        if index:
            print(
                f"jpc: the last call of `{name}` failed its runtime check, which was "
                f"still pending at exit (its results are not valid): "
                f"{messages[index - 1]} Call `jpc.raise_pending_step_errors()` at "
                "the end of training to raise it instead.",
                file=sys.stderr,
            )


atexit.register(_report_pending_at_exit)


_caches: list[dict] = []  # the program cache of every `lean_jit` function


def forget_compiled() -> None:
    """Drop every program compiled by a `lean_jit` function: the next call of each
    traces and compiles again (after a setting read at trace time changed)."""
    for cache in _caches:
        cache.clear()


def deferred_checks(fn: Callable) -> Callable:
    """Mark `fn` (before `lean_jit`) as a training step whose checks may be
    reported at its next call (see `set_step_error_timing`)."""
    fn._jpc_deferred_checks = True  # type: ignore[attr-defined]
    return fn


def lean_jit(fn: Callable) -> Callable:
    """`eqx.filter_jit(fn)` with a small per-call cost.

    Arrays (JAX or NumPy) are traced and every other leaf is static, as in
    `eqx.filter_jit`; like it, a call whose program holds an `eqx.error_if` check
    waits for its result, so that a failure is raised at the call as
    `eqx.EquinoxRuntimeError`. Checks made with `error_if` (below) are flags
    instead: the call waits only for the flag, or, for a function marked with
    `deferred_checks` and the default timing, inspects it at its next call.
    Calls of programs without a check return at once, as with `jax.jit`.
    `jitted.lower(*args, **kwargs)` gives the program of a call, for inspection.
    """
    cache: dict = {}  # (treedef, slots) -> [jitted, wait or None (undecided)]
    _caches.append(cache)
    deferred = getattr(fn, "_jpc_deferred_checks", False)
    name = getattr(fn, "__name__", "jitted function")
    wrong = wrong_spellings(fn)
    compilations = _Compilations(fn)

    def jitted(*args, **kwargs):
        check_spellings(fn, wrong, kwargs)
        treedef, slots, arrays = flatten((args, kwargs))
        key = (treedef, slots)
        try:
            entry = cache.get(key)
        except TypeError as err:
            raise _unhashable(fn, err) from None
        if entry is None:
            compilations.note(args, kwargs)
            if len(cache) >= _JIT_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            entry = cache[key] = [jax.jit(_traceable(fn, treedef, slots)), None]
        compiled, wait = entry
        if wait is None and not any(isinstance(a, jax.core.Tracer) for a in arrays):
            wait = entry[1] = _must_wait(compiled, arrays)
        if wait:
            _callback_logger.addFilter(_quiet_callback_failure)
        try:
            out_arrays, out_static = compiled(arrays)
            rebuild, messages = out_static.value
            code = out_arrays.pop() if messages else None
            probe = code if messages else (out_arrays[0] if out_arrays else None)
            concrete = probe is not None and not isinstance(probe, jax.core.Tracer)
            if messages and not concrete:
                out_arrays = _traced_check(out_arrays, code, messages)
            # Rebuild the outputs while the program runs, then wait if needed.
            out = rebuild(out_arrays, remember=concrete)
            if wait and concrete and out_arrays:
                out_arrays[0].block_until_ready()
        except (jax.errors.JaxRuntimeError, ValueError) as err:
            _raise_runtime_error(err)
        finally:
            if wait:
                _callback_logger.removeFilter(_quiet_callback_failure)
        if messages and concrete:
            previous = _pending.pop(jitted, None) if deferred else None
            if previous is not None:  # this call's results are dropped if it raises
                _check_code(*previous, previous=True)
            if deferred and _timing["when"] == "next_call":
                _pending[jitted] = (code, messages, name)
            else:
                _check_code(code, messages, name, previous=False)
        return out

    def lower(*args, **kwargs):
        """`jax.jit(...).lower` of the program a call with these arguments runs
        (for inspection: `.compile().cost_analysis()`, `.as_text()`)."""
        treedef, slots, arrays = flatten((args, kwargs))
        return jax.jit(_traceable(fn, treedef, slots)).lower(arrays)

    jitted.lower = lower  # type: ignore[attr-defined]
    jitted.compilations = compilations  # type: ignore[attr-defined]
    return present(jitted, fn)


RECOMPILE_WARNING_AFTER = 4  # new programs caused by the same argument


class _Compilations:
    """Counts the programs a jitted function compiles, to warn once when the same
    argument keeps forcing new ones by being a new object of the same kind (an
    optimiser or function created inside a loop).

    A change of structure or of a plain value (a new width, option string or step
    count) is a deliberate new program and never counts.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.count = 0
        self.streaks: dict[str, int] = {}
        self.last: dict | None = None
        self.warned = False
        try:
            self.signature = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None

    def note(self, args: tuple, kwargs: dict) -> None:
        """Record a new program for `(args, kwargs)`; warn once if one argument was
        a new object of the same kind for several programs in a row."""
        self.count += 1
        if self.warned or self.signature is None:
            return
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
            keys = {name: flatten(value)[:2] for name, value in bound.items()}
        except (TypeError, ValueError):
            return
        last, self.last = self.last, keys
        if last is None:
            return
        renewed = [n for n in keys if n in last and _renewed(last[n], keys[n])]
        self.streaks = {n: self.streaks.get(n, 0) + 1 for n in renewed}
        for name in renewed:
            if self.streaks[name] >= RECOMPILE_WARNING_AFTER:
                self.warned = True
                message = _recompile_message(self.fn, self.count, name)
                warnings.warn(message, stacklevel=4)
                return


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _renewed(old: tuple, new: tuple) -> bool:
    """Whether `new` differs from `old` only by new callables in the same places."""
    (old_def, old_slots), (new_def, new_slots) = old, new
    if old_def != new_def or len(old_slots) != len(new_slots):
        return False
    pairs = [(a, b) for a, b in zip(old_slots, new_slots) if not _same(a, b)]
    for a, b in pairs:
        if type(a) is _Structure and type(b) is _Structure:
            if a.treedef != b.treedef or not _renewed_leaves(a.static, b.static):
                return False
        elif not (callable(a) and callable(b)):
            return False
    return bool(pairs)


def _renewed_leaves(old: tuple, new: tuple) -> bool:
    pairs = [(a, b) for a, b in zip(old, new) if not _same(a, b)]
    return all(callable(a) and callable(b) for a, b in pairs)


def _recompile_message(fn: Callable, count: int, name: str) -> str:
    return (
        f"`{fn.__name__}` has compiled {count} programs; the last "
        f"{RECOMPILE_WARNING_AFTER} were needed because `{name}` was a new object of "
        "the same kind each time (new functions inside it). Non-array arguments are "
        "part of the compiled program, so every new one compiles again. If it is an "
        "optimiser created inside the loop (e.g. a new `optax.sgd(...)` per step), "
        "create it once before the loop; to change a learning rate without "
        "recompiling, use `optax.inject_hyperparams` (or `activity_lr=` for the "
        "activity step size)."
    )


def filter_jit(fn: Callable) -> Callable:
    """`eqx.filter_jit(fn)` presented as `fn` (name, signature and docstring in
    `help`), with the keyword hints of `lean_jit`."""
    jitted = eqx.filter_jit(fn)
    wrong = wrong_spellings(fn)

    def wrapper(*args, **kwargs):
        check_spellings(fn, wrong, kwargs)
        return jitted(*args, **kwargs)

    return present(wrapper, fn)


def error_if(tree: Any, pred: Any, msg: str) -> Any:
    """`eqx.error_if(tree, pred, msg)` whose host check sees only a scalar.

    `eqx.error_if` routes `tree` itself through a host callback, which makes the
    SPMD partitioner gather every array of `tree` onto one device. Here the check
    runs on a scalar and `tree` is returned bitwise unchanged, through a select on
    that scalar that keeps the check in the program (with `EQX_ON_ERROR=nan` the
    floating-point arrays become NaN, as with `eqx.error_if`).

    Directly inside the trace of a `lean_jit` function (not under a `vmap`, a
    loop or a nested `jax.jit`) with `EQX_ON_ERROR=raise`, the check is instead
    a flag that the call inspects (see the module doc), and `tree` is returned
    as it is.
    """
    checks = _collector()
    if checks is not None:  # inside a `lean_jit` trace: a flag, no host callback
        checks.append((pred, msg))
        return tree
    flag = eqx.error_if(jnp.zeros(()), pred, msg)

    def keep(leaf):
        if eqx.is_inexact_array(leaf):
            return jnp.where(flag == 0, leaf, jnp.nan)
        return leaf

    return jtu.tree_map(keep, tree)
