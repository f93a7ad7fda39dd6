"""Checkpoints of a training state with Equinox's serialisation.

A checkpoint file is one line of JSON (a format tag and, for every saved leaf, its
path, shape and dtype) followed by the bytes of `eqx.tree_serialise_leaves`. The
header lets [`jpc.load_checkpoint`][] say which leaf does not match before any
data is read; the rest is Equinox's own format.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._jit import raise_pending_step_errors
from ._types import PyTree


_FORMAT = "jpc.checkpoint"
_VERSION = 1


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _is_saved(leaf: Any) -> bool:
    """Leaves that `eqx.tree_serialise_leaves` writes by default."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float))


def _describe(leaf: Any) -> dict[str, Any]:
    if isinstance(leaf, (bool, int, float)):
        return {"shape": [], "dtype": f"python {type(leaf).__name__}"}
    return {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}


def _header(state: PyTree) -> dict[str, Any]:
    leaves = jtu.tree_flatten_with_path(state)[0]
    entries = [
        {"path": jtu.keystr(path), **_describe(leaf)}
        for path, leaf in leaves
        if _is_saved(leaf)
    ]
    return {"format": _FORMAT, "version": _VERSION, "leaves": entries}


def _to_raw(state: PyTree) -> PyTree:
    """Typed PRNG keys replaced by their `uint32` key data (saved as plain arrays)."""
    return jtu.tree_map(
        lambda leaf: jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf, state
    )


def _from_raw(raw: PyTree, like: PyTree) -> PyTree:
    def restore(loaded, template):
        if _is_typed_key(template):
            impl = jax.random.key_impl(template)
            return jax.random.wrap_key_data(loaded, impl=impl)
        return loaded

    return jtu.tree_map(restore, raw, like)


def _non_finite_leaf(state: PyTree) -> str | None:
    """Key path of the first floating-point leaf holding NaN or inf, or `None`."""
    for path, leaf in jtu.tree_flatten_with_path(state)[0]:
        dtype = getattr(leaf, "dtype", None)
        inexact = dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
        if (isinstance(leaf, float) or (_is_saved(leaf) and inexact)) and not np.all(
            np.isfinite(np.asarray(leaf))
        ):
            return jtu.keystr(path)
    return None


def _umask() -> int:
    """The process's umask.

    Read from `/proc/self/status` where the system has it; elsewhere reading it
    means setting it, so it is set straight back (files another thread creates in
    between would get the permissions of a zero umask).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(
    path: str | os.PathLike, state: PyTree, *, allow_non_finite: bool = False
) -> None:
    """Save a training state (any pytree) to the file `path`.

    Typically `state = dict(model=..., skip_model=..., opt_state=..., key=...,
    step=...)`: every array leaf (parameters, optimiser moments, PRNG keys, both
    typed `jax.random.key` and legacy `uint32` ones) and every Python or NumPy
    scalar (a step counter, or the position of a
    [`jpc.datasets.batches`][] iterator) is saved with
    `eqx.tree_serialise_leaves`; non-array leaves such as activation functions are
    not saved and come from the template given to [`jpc.load_checkpoint`][]. The
    file is written to a temporary file beside `path` and then renamed, so an
    interrupted save leaves any previous checkpoint at `path` intact. The file's
    permissions follow the process's umask, as for a file made with `open`.

    A diverged step must not end up on disk as a valid model, so before writing
    anything the runtime check of the last call of every training step is
    reported (training steps report a failed check at their next call by default,
    see [`jpc.set_step_error_timing`][]) and every floating-point leaf must be
    finite.

    **Arguments:**

    - `path`: file to write (parent directories are created).
    - `state`: the pytree to save.
    - `allow_non_finite`: save floating-point leaves holding NaN or inf instead of
        raising (default `False`).

    **Returns:**

    Nothing.

    **Raises:**

    `eqx.EquinoxRuntimeError` if the last call of a training step failed its
    runtime check (e.g. its energy was not finite); `ValueError` if a
    floating-point leaf holds NaN or inf and `allow_non_finite=False` (the message
    names the leaf). Nothing is written in either case.
    """
    raise_pending_step_errors()
    if not allow_non_finite:
        bad = _non_finite_leaf(state)
        if bad is not None:
            raise ValueError(
                f"`state` leaf `{bad}` holds NaN or inf; refusing to save it as a "
                "checkpoint (a diverged step?). Pass `allow_non_finite=True` to save "
                "it anyway."
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = json.dumps(_header(state)).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            eqx.tree_serialise_leaves(f, _to_raw(state))
        os.chmod(tmp, 0o666 & ~_umask())  # `mkstemp` makes the file 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_header(f, path: Path) -> dict[str, Any]:
    line = f.readline()
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError(
            f"`path` ({str(path)!r}) is not a checkpoint written by "
            "`jpc.save_checkpoint` (no checkpoint header on its first line)."
        )
    if header.get("version") != _VERSION:
        raise ValueError(
            f"The checkpoint at {str(path)!r} has format version "
            f"{header.get('version')!r}; this version of jpc reads {_VERSION}."
        )
    return header


def _check_match(found: list[dict], expected: list[dict]) -> None:
    for i, (exp, got) in enumerate(zip(expected, found)):
        if exp["path"] != got["path"]:
            raise ValueError(
                f"The checkpoint does not match the structure of `like`: saved leaf "
                f"{i} is `{got['path']}` but `like` has `{exp['path']}` there."
            )
        if (exp["shape"], exp["dtype"]) != (got["shape"], got["dtype"]):
            raise ValueError(
                f"The checkpoint does not match `like` at leaf `{exp['path']}`: "
                f"expected shape {tuple(exp['shape'])} and dtype {exp['dtype']}, "
                f"found shape {tuple(got['shape'])} and dtype {got['dtype']}."
            )
    if len(found) != len(expected):
        extra = len(found) > len(expected)
        longer, name = (found, "the checkpoint") if extra else (expected, "`like`")
        raise ValueError(
            f"The checkpoint does not match the structure of `like`: it holds "
            f"{len(found)} saved leaves and `like` {len(expected)}; the first extra "
            f"one, in {name}, is `{longer[min(len(found), len(expected))]['path']}`."
        )


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a state saved by [`jpc.save_checkpoint`][] into the structure of `like`.

    `like` is a pytree of the same structure as the saved state, e.g. a freshly
    built model and optimiser state (`optim.init(...)`), a key and a step counter;
    its arrays' values are not used, only their shapes and dtypes (which must match
    the saved ones), and its non-array leaves are kept as they are. Loading is exact:
    continuing training from a loaded state gives the same numbers, bit for bit, as
    never having stopped.

    **Arguments:**

    - `path`: a file written by [`jpc.save_checkpoint`][].
    - `like`: template pytree.

    **Returns:**

    A pytree like `like` holding the saved values.

    **Raises:**

    `ValueError` if the file is not a checkpoint, or if its structure, a leaf's
    shape or a leaf's dtype differs from `like` (the message names the first leaf
    that differs, with the expected and found shape and dtype).
    """
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        _check_match(header["leaves"], _header(like)["leaves"])
        raw = eqx.tree_deserialise_leaves(f, _to_raw(like))
    return _from_raw(raw, like)
