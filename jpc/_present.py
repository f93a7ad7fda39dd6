"""How the public functions present themselves to a user.

- `present(wrapper, fn)`: a wrapper (e.g. a jitted function) shows `fn`'s name,
  docstring and a brief signature in `help`, `inspect.signature` and the REPL, with
  annotations such as `float | Array` instead of the fully expanded jaxtyping unions.
- `keyword_hints(fn)`: the compatible API spells some options two ways across
  functions (`loss` / `loss_id`, `solver` / `ode_solver`); a call with the other
  spelling gets a `TypeError` that says which one this function takes.
"""

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import optax

from ._types import Scalar


# The other spelling of an option in the compatible API.
_SPELLINGS = {
    "loss": "loss_id",
    "loss_id": "loss",
    "solver": "ode_solver",
    "ode_solver": "solver",
}
_QUALIFIER = re.compile(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*)")
_SCALAR_ARGS = frozenset(typing.get_args(Scalar))
_NAMED = ((optax.OptState, "OptState"),)


class _Text:
    """An annotation shown as its text (no quotes) by `inspect` and `help`."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _brief(annotation: Any) -> str:
    """Short text of an annotation: no module paths, `Scalar` as `float | Array`."""
    if annotation is None or annotation is type(None):
        return "None"
    for alias, name in _NAMED:
        try:
            if annotation == alias:
                return name
        except Exception:  # an annotation whose `==` does not return a bool
            pass
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if _SCALAR_ARGS <= set(args):
            rest = [_brief(a) for a in args if a not in _SCALAR_ARGS]
            return " | ".join(["float | Array", *rest])
        return " | ".join(_brief(a) for a in args)
    text = _QUALIFIER.sub("", inspect.formatannotation(annotation))
    for alias, name in _NAMED:  # also inside e.g. `Sequence[...]`
        text = text.replace(_QUALIFIER.sub("", inspect.formatannotation(alias)), name)
    return text


def brief_signature(fn: Callable) -> inspect.Signature:
    """`inspect.signature(fn)` with every annotation replaced by its brief text."""
    signature = inspect.signature(fn)
    empty = inspect.Parameter.empty

    def short(annotation):
        return annotation if annotation is empty else _Text(_brief(annotation))

    parameters = [
        p.replace(annotation=short(p.annotation)) for p in signature.parameters.values()
    ]
    return signature.replace(
        parameters=parameters,
        return_annotation=short(signature.return_annotation),
    )


def present(wrapper: Callable, fn: Callable) -> Callable:
    """Make `wrapper` show `fn`'s name, docstring, module and brief signature."""
    functools.update_wrapper(wrapper, fn)
    try:
        wrapper.__signature__ = brief_signature(fn)  # type: ignore[attr-defined]
    except (TypeError, ValueError):  # no signature to show (e.g. a builtin)
        pass
    return wrapper


def wrong_spellings(fn: Callable) -> Mapping[str, str]:
    """`{other spelling: the option fn takes}` for the options `fn` spells one way
    (read-only)."""
    taken = inspect.signature(fn).parameters
    wrong = {
        name: other
        for name, other in _SPELLINGS.items()
        if name not in taken and other in taken
    }
    return types.MappingProxyType(wrong)


def check_spellings(fn: Callable, wrong: Mapping[str, str], kwargs: dict) -> None:
    """Raise a `TypeError` naming the right option if `kwargs` uses a wrong one."""
    if wrong and not wrong.keys().isdisjoint(kwargs):
        name = next(n for n in kwargs if n in wrong)
        raise TypeError(
            f"{fn.__name__}() got an unexpected keyword argument `{name}`: this "
            f"function takes `{wrong[name]}=` instead (both spellings exist in the "
            "compatible API; each function keeps its own)."
        )


def keyword_hints(fn: Callable) -> Callable:
    """Wrap `fn` so that the other spelling of `loss_id`/`ode_solver`/... is explained.

    Returns `fn` itself when it takes none of those options. (The jitted entry
    points do the same check in their jit wrapper.)
    """
    wrong = wrong_spellings(fn)
    if not wrong:
        return fn

    def wrapper(*args, **kwargs):
        check_spellings(fn, wrong, kwargs)
        return fn(*args, **kwargs)

    return present(wrapper, fn)
