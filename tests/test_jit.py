"""`lean_jit`, the low-overhead `eqx.filter_jit` behind every jitted entry point.

Reference: `eqx.filter_jit` on the same function (a second code path), plus
Python-side trace counters for (re)compilation.
"""

import gc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import assert_trees_close

import jpc
from jpc import _jit


class Holder(eqx.Module):
    """A module with a mutable `list` field: never remembered by identity."""

    items: list


def _fn(model, x, *, scale, name="a", extra=None):
    out = jpc.make_mlp  # a static, non-array output leaf
    z = x
    for layer in model:
        z = jax.vmap(layer)(z)
    new_model = jax.tree_util.tree_map(
        lambda w: w * scale if eqx.is_array(w) else w, model
    )
    return {"z": z, "model": new_model, "name": name, "fn": out, "none": extra}


@pytest.fixture
def setup(key):
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    x = jr.normal(jr.PRNGKey(5), (5, 3))
    return model, x


def test_matches_filter_jit_including_static_outputs(setup):
    model, x = setup
    ours = _jit.lean_jit(_fn)(model, x, scale=np.asarray(2.0), name="b")
    ref = eqx.filter_jit(_fn)(model, x, scale=np.asarray(2.0), name="b")
    assert ours["name"] == "b" and ours["fn"] is jpc.make_mlp and ours["none"] is None
    assert_trees_close((ours["z"], ours["model"]), (ref["z"], ref["model"]), rtol=1e-12)


def test_traces_once_per_static_structure(setup):
    model, x = setup
    traces = []

    def f(model, x, scale):
        traces.append(scale)
        return _fn(model, x, scale=scale)["z"]

    jitted = _jit.lean_jit(f)
    jitted(model, x, 0.5)
    jitted(model, 2 * x, 0.5)  # new array values: no new trace
    jitted(model, x, np.asarray(0.7))  # an array scalar: traced
    jitted(model, x, np.asarray(0.9))
    assert len(traces) == 2
    jitted(model, x, 0.6)  # a new Python float is static, as in `eqx.filter_jit`
    assert len(traces) == 3


def test_chained_outputs_are_reused_and_correct(setup):
    # The model returned by one call is passed to the next, as in a training loop;
    # results must match `eqx.filter_jit` step by step.
    model, x = setup
    ours, ref = _jit.lean_jit(_fn), eqx.filter_jit(_fn)
    m_ours = m_ref = model
    for _ in range(3):
        out_ours = ours(m_ours, x, scale=np.asarray(1.5))
        out_ref = ref(m_ref, x, scale=np.asarray(1.5))
        assert_trees_close(out_ours["z"], out_ref["z"], rtol=1e-12)
        m_ours, m_ref = out_ours["model"], out_ref["model"]
    assert id(m_ours[0]) in _jit._modules  # remembered for the next call


def test_list_mutated_in_place_is_seen(setup):
    model, x = setup
    jitted = _jit.lean_jit(_fn)
    model = list(model)
    before = jitted(model, x, scale=np.asarray(1.0))["z"]
    model[0] = jax.tree_util.tree_map(
        lambda w: 3 * w if eqx.is_array(w) else w, model[0]
    )
    after = jitted(model, x, scale=np.asarray(1.0))["z"]
    assert_trees_close(after, eqx.filter_jit(_fn)(model, x, scale=1.0)["z"])
    assert not np.allclose(before, after)


def test_module_with_mutable_field_is_not_remembered():
    holder = Holder([jnp.ones(2)])
    f = _jit.lean_jit(lambda h: h.items[0] * 2)
    assert_trees_close(f(holder), 2 * jnp.ones(2))
    holder.items[0] = jnp.full(2, 5.0)  # in-place change of a "frozen" module
    assert_trees_close(f(holder), jnp.full(2, 10.0))
    assert id(holder) not in _jit._modules


def test_remembered_module_is_forgotten_when_it_dies(setup):
    model, x = setup
    out = _jit.lean_jit(_fn)(model, x, scale=np.asarray(1.0))
    key = id(out["model"][0])
    assert key in _jit._modules
    del out
    gc.collect()
    entry = _jit._modules.get(key)
    assert entry is None or entry[0]() is not None


def test_runtime_error_is_raised_at_the_call():
    f = _jit.lean_jit(lambda x: eqx.error_if(x, x > 0, "positive input"))
    assert_trees_close(f(jnp.asarray(-1.0)), jnp.asarray(-1.0))
    with pytest.raises(eqx.EquinoxRuntimeError, match="positive input"):
        f(jnp.asarray(1.0))


def test_inside_outer_jit_and_vmap(setup):
    model, x = setup
    f = _jit.lean_jit(_fn)
    eager = f(model, x, scale=np.asarray(1.0))["z"]
    outer = jax.jit(lambda x: f(model, x, scale=np.asarray(1.0))["z"])(x)
    assert_trees_close(outer, eager, rtol=1e-12)
    rows = jax.vmap(lambda xi: f(model, xi[None], scale=np.asarray(1.0))["z"][0])(x)
    assert_trees_close(rows, eager, rtol=1e-12)


def test_error_if_returns_tree_unchanged_and_raises():
    tree = {"a": jnp.asarray([-0.0, 1.5, jnp.inf]), "i": jnp.arange(3)}
    f = jax.jit(lambda t, p: _jit.error_if(t, p, "bad value"))
    out = f(tree, False)
    assert np.array_equal(np.signbit(out["a"]), np.signbit(tree["a"]))
    assert_trees_close(out, tree, rtol=0)
    with pytest.raises(Exception, match="bad value"):
        jax.block_until_ready(f(tree, True))


class Unhashable:
    """A static leaf that cannot be hashed (like a `set`)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other):
        return isinstance(other, Unhashable)


class WithUnhashable(eqx.Module):
    weight: jax.Array
    tag: object


@pytest.mark.parametrize("where", ["module", "argument"])
def test_unhashable_static_leaf_raises_like_filter_jit(where):
    # Before: a module with an unhashable static leaf was re-traced and compiled on
    # every call, silently. `eqx.filter_jit` refuses it with a `ValueError`.
    traces = []

    def f(tree):
        traces.append(1)
        return jax.tree_util.tree_leaves(tree)[0] * 2

    tree = WithUnhashable(jnp.ones(2), Unhashable())
    if where == "argument":
        tree = (jnp.ones(2), Unhashable())
    with pytest.raises(ValueError, match="Non-hashable"):
        eqx.filter_jit(f)(tree)
    with pytest.raises(ValueError, match="Non-hashable"):
        _jit.lean_jit(f)(tree)


def test_equal_structures_share_the_compiled_program(setup):
    # Structures are keys by content: forgetting every remembered flattening must
    # not cause a new trace for the same model structure.
    model, x = setup
    traces = []

    def f(model, x):
        traces.append(1)
        return _fn(model, x, scale=np.asarray(1.0))["z"]

    jitted = _jit.lean_jit(f)
    first = jitted(model, x)
    _jit._structures.clear()
    _jit._modules.clear()
    copy = jax.tree_util.tree_map(lambda a: a + 0 if eqx.is_array(a) else a, model)
    second = jitted(copy, x)
    assert len(traces) == 1
    assert_trees_close(second, first, rtol=0)


def _checked(x):
    return eqx.error_if(x * 2, x > 0, "positive input")


def test_only_programs_with_a_check_wait(setup):
    model, x = setup
    plain = _jit.lean_jit(_fn)
    plain(model, x, scale=np.asarray(1.0))
    checked = _jit.lean_jit(_checked)
    checked(jnp.asarray(-1.0))
    wait_of = {id(f): [e[1] for e in f_cache(f)] for f in (plain, checked)}
    assert wait_of[id(plain)] == [False]
    assert wait_of[id(checked)] == [True]
    # An asynchronous result is still the right value (reference: `eqx.filter_jit`).
    out = plain(model, 3 * x, scale=np.asarray(0.5))
    ref = eqx.filter_jit(_fn)(model, 3 * x, scale=np.asarray(0.5))
    assert_trees_close((out["z"], out["model"]), (ref["z"], ref["model"]), rtol=1e-12)


def f_cache(f):
    """The `cache` dict closed over by a `lean_jit` wrapper."""
    (cache,) = [
        c.cell_contents
        for c in f.__closure__
        if isinstance(c.cell_contents, dict) and c.cell_contents is not _jit._kinds
    ]
    return cache.values()


@pytest.mark.parametrize("eager_first", [True, False])
def test_checked_program_inside_outer_jit(eager_first):
    # A program that waits when called eagerly must not wait on tracers (and the
    # other way round), whichever of the two calls comes first.
    checked = _jit.lean_jit(_checked)
    outer = jax.jit(lambda x: checked(x) + 1)
    calls = [lambda: checked(jnp.asarray(-1.0)), lambda: outer(jnp.asarray(-1.0))]
    results = [c() for c in (calls if eager_first else calls[::-1])]
    assert sorted(float(r) for r in results) == [-2.0, -1.0]
    with pytest.raises(eqx.EquinoxRuntimeError, match="positive input"):
        checked(jnp.asarray(1.0))
