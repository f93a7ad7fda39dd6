"""Runs of identical layers held stacked, with their activities, for a whole step.

The hidden blocks of a deep network (those of [`jpc.make_mlp`][], with or without
the identity skips of [`jpc.make_skip_model`][], any parameterisation) share one
structure. Here such a run is a [`Run`][]: the array leaves of its layers stacked
along a new leading axis. Its activities are likewise one `(n, batch, ...)` array,
from the feedforward pass through every inference step to the parameter update.
The feedforward pass is one `jax.lax.scan` over the run and the energy's
predictions (which, given the activities, do not depend on each other) one
`jax.vmap` over it, so either is traced once, whatever the length of the run. The
list of layers the user holds, and the list of activities returned, are
unchanged: the network is stacked when a step is traced, the activities are split
into the list once, at the end of the step, and the parameter gradients are split
by the transpose of the stacking ([`stack`][]).

Unlike `jpc._stacked`'s scans (which stack and split at every evaluation of the
energy), nothing is split inside the inference loop, and the splits that remain
take indices the compiler cannot fold ([`split`][]), so that each is one kernel
whatever the length of the run. What remains per layer is what the interface
makes so: each layer's parameter update (the optimiser state is the user's) and
the split into the lists returned.

The predictions apply the layer function of the feedforward pass, mapped over the
layers: on the CPU backend the hidden errors at the feedforward state come out
exactly 0, as in the unrolled program (`tests/test_packed.py`); a backend whose
batched matrix products round differently from single ones would leave errors of
the order of the rounding there instead.
"""

from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._jit import forget_compiled
from ._layers import get_param_scalings, predict, skip_at
from ._stacked import _body, _fits, _signature, _stack, runs_of
from ._types import Array
from ._utils import LOSS_FNS


# Read at trace time (see `set_layer_stacking`): the shortest run of identical
# layers that `make_pc_step` with discrete inference holds stacked.
MIN_RUN: int | None = 64
ALWAYS = 4  # the shortest run the tests and benchmarks stack


def set_layer_stacking(min_layers: int | None) -> int | None:
    """Choose which deep networks have their hidden layers held stacked.

    In a training step of [`jpc.make_pc_step`][] with discrete inference
    (`activity_optim` and `n_inference_steps`), supervised and without
    `nudging`, each run of at least `min_layers` consecutive layers of one
    structure (the hidden blocks of [`jpc.make_mlp`][], with or without the skips
    of [`jpc.make_skip_model`][], in any parameterisation) is held as one stack
    of parameters, and its activities as one array, from the feedforward pass to
    the parameter update: the feedforward pass is one `jax.lax.scan` and the
    energy's predictions one `jax.vmap` over the layers, so the compile time grows
    much more slowly with the depth of the run. The model, the optimiser state and
    the activities you pass and get back are the same lists as always, and the
    results are those of the layer-by-layer program to floating-point rounding.

    The activity optimiser then updates the stacked activities as one array: the
    same as layer by layer for elementwise optimisers (SGD, momentum, Adam,
    global-norm clipping); an optimiser that treats each array as a whole (a norm
    or factorisation per array, such as `optax.lars` or `optax.adafactor`) is
    detected when the step is traced and keeps the layers apart.

    Measured on a 2-core CPU with a μPC residual MLP of width 64 (see the
    performance page): at 128 layers the first call took 0.45–0.61× the
    layer-by-layer program's and the step was as fast; at 16 to 64 layers the
    step was up to 1.2× slower in wall time (the layer-by-layer program runs
    independent layers on both cores at once), hence the default of 64. On an
    accelerator shorter runs may pay off too (not measured).

    **Arguments:**

    - `min_layers`: the shortest run that is stacked (at least 2); `None` turns
        stacking off. The default setting is 64.

    **Returns:**

    The previous setting, so that it can be restored.

    **Raises:**

    `ValueError` if `min_layers` is neither `None` nor an integer of at least 2.

    !!! note
        The setting is read when a step is traced. Changing it drops the programs
        that `jpc`'s own functions have compiled, so their next calls compile
        again; a function of yours that you compiled with `jax.jit` around a step
        keeps the setting it was traced with.
    """
    ok = min_layers is None or (
        isinstance(min_layers, (int, np.integer))
        and not isinstance(min_layers, bool)
        and min_layers >= 2
    )
    if not ok:
        raise ValueError(
            "`min_layers` must be None or an integer of at least 2, got "
            f"{min_layers!r}."
        )
    global MIN_RUN
    previous, MIN_RUN = MIN_RUN, None if min_layers is None else int(min_layers)
    if MIN_RUN != previous:
        forget_compiled()
    return previous


class Run(eqx.Module):
    """Layers `start..stop-1` of a network, alike, with their array leaves stacked."""

    dynamic: Any
    scales: Array | None
    static: Any = eqx.field(static=True)
    const: Any = eqx.field(static=True)
    start: int = eqx.field(static=True)
    stop: int = eqx.field(static=True)

    def feedforward(self, z: Array) -> tuple[Array, Array]:
        """Carry `z` through the run: the last output and all `(n, batch, ...)`."""
        apply = _body(predict, self.static, self.const)

        def step(z, params):
            out = apply(*params, z)
            return out, out

        return jax.lax.scan(step, z, (self.dynamic, self.scales))

    def predictions(self, inputs: Array) -> Array:
        """Each layer's prediction from its own input in `inputs`, `(n, batch, ...)`."""
        apply = _body(predict, self.static, self.const)
        return jax.vmap(apply)(self.dynamic, self.scales, inputs)


class PackedNetwork(eqx.Module):
    """A network whose runs of identical layers are [`Run`][]s.

    `entries` holds, in order, `(layer, skip, scale)` for a single layer and a
    [`Run`][] for each run; activities are laid out alike, one array per entry.
    """

    entries: list
    n_layers: int = eqx.field(static=True)

    def __len__(self) -> int:
        return self.n_layers


def _opaque_indices(n: int, probe: Array) -> tuple[Array, ...]:
    """`0, ..., n - 1` as scalars the compiler cannot fold into constants.

    They leave a `while_loop` whose trip count it cannot know (one trip if the
    first entry of `probe` is NaN, else none) and whose body (`min(i, n - 1)`)
    leaves them unchanged. Folded (constant) indices would make each slice of
    [`split`][], and whatever it is fused with, a kernel of its own.
    """
    first = probe[(0,) * probe.ndim]
    trips = (first != first).astype(jnp.int32)

    def body(carry):
        k, indices = carry
        return k + 1, tuple(jnp.minimum(i, n - 1) for i in indices)

    init = (jnp.int32(0), tuple(jnp.int32(i) for i in range(n)))
    return jax.lax.while_loop(lambda carry: carry[0] < trips, body, init)[1]


def split(stacked: Array, axis: int = 0) -> list[Array]:
    """The entries of `stacked` along `axis`, as a list.

    Each is a `dynamic_slice` at an index the compiler cannot see (see
    `_opaque_indices`), so that the `n` slices, and whatever they are fused
    with, compile to one kernel, not `n`: the program does not grow with `n`.
    """
    indices = _opaque_indices(stacked.shape[axis], stacked)
    return [jax.lax.dynamic_index_in_dim(stacked, i, axis, False) for i in indices]


@jax.custom_vjp
def stack(arrays: tuple) -> Array:
    """`jnp.stack(arrays)`, whose transpose is [`split`][]."""
    return jnp.stack(arrays)


def _stack_fwd(arrays):
    return jnp.stack(arrays), None


def _stack_bwd(_, cotangent):
    return (tuple(split(cotangent)),)


stack.defvjp(_stack_fwd, _stack_bwd)


def find_runs(model, skip_model, scalings) -> dict[int, int]:
    """`{start: stop}` of the runs of at least `MIN_RUN` identical hidden layers.

    The last layer, whose output is clamped, is never part of a run."""
    if MIN_RUN is None:
        return {}
    n = len(model)
    sigs = [_signature(model[i], skip_at(skip_model, i), scalings[i]) for i in range(n)]
    return runs_of(sigs[:-1], MIN_RUN)


def pack_network(model, skip_model, scalings, x: Array) -> PackedNetwork | None:
    """The network with its runs stacked, or `None` if it has none (or if a run
    does not map an input of `x`'s feedforward shape to that shape)."""
    runs = find_runs(model, skip_model, scalings)
    if not runs:
        return None
    entries, i, z = [], 0, x
    while i < len(model):
        layer, skip = model[i], skip_at(skip_model, i)
        stop = runs.get(i)
        if stop is None:
            entries.append((layer, skip, scalings[i]))
            name = "input" if i == 0 else f"the output of model[{i - 1}]"
            z = jax.eval_shape(partial(predict, layer, skip, scalings[i], name=name), z)
            i += 1
            continue
        layers = [model[j] for j in range(i, stop)]
        skips = [skip_at(skip_model, j) for j in range(i, stop)]
        group = (layers, skips, scalings[i:stop])
        dynamic, static, const, scales = _stack(*group, stack=stack)
        if not _fits(_body(predict, static, const), dynamic, scales, z):
            return None
        entries.append(Run(dynamic, scales, static, const, i, stop))
        i = stop
    return PackedNetwork(entries, len(model))


def packer(params, input, param_type, gamma) -> tuple:
    """`(pack, net)`: `pack` maps `(model, skip_model)` to the network with its long
    runs of identical layers stacked (see [`set_layer_stacking`][]) and `net` is
    `pack(params)`; `(None, None)` if the network has no such run (or is
    unsupervised, `input=None`) and every layer stays apart."""
    if input is None:
        return None, None

    def pack(p):
        model, skip_model = p
        scalings = get_param_scalings(
            model, input, skip_model=skip_model, param_type=param_type, gamma=gamma
        )
        return pack_network(model, skip_model, scalings, input)

    net = pack(params)
    return (None, None) if net is None else (pack, net)


def feedforward(net: PackedNetwork, x: Array) -> list[Array]:
    """Packed activities of the feedforward pass from `x`."""
    outputs, z = [], x
    for entry in net.entries:
        if isinstance(entry, Run):
            z, outs = entry.feedforward(z)
            outputs.append(outs)
        else:
            z = predict(*entry, z)
            outputs.append(z)
    return outputs


def layer_energies(
    net: PackedNetwork,
    activities: list,
    y: Array,
    x: Array,
    loss: str,
    output_energy_scaling: Any,
    kappas: list,
) -> Array:
    """Energies `[E_1, ..., E_L]` of each layer as one `(L,)` array, as
    `jpc._energies.layer_energies`; `kappas` are the hidden terms' precisions
    (`None` where 1)."""
    batch = y.shape[0]
    energies, z, i = [], x, 0
    for entry, a in zip(net.entries[:-1], activities[:-1]):
        if isinstance(entry, Run):
            inputs = jnp.concatenate([z[None], a[:-1]])
            preds = entry.predictions(inputs)
            axes = tuple(range(1, a.ndim))
            run = 0.5 * jnp.sum((a - preds) ** 2, axis=axes) / batch
            k = kappas[entry.start : entry.stop]
            if k[0] is not None:
                run = run * jnp.stack([jnp.asarray(v, run.dtype) for v in k])
            energies.append(run)
            z, i = a[-1], entry.stop
        else:
            e = 0.5 * jnp.sum((a - predict(*entry, z)) ** 2) / batch
            energies.append((e if kappas[i] is None else kappas[i] * e)[None])
            z, i = a, i + 1
    output_energy = LOSS_FNS[loss](predict(*net.entries[-1], z), y)
    if output_energy_scaling is not None:
        output_energy = output_energy_scaling * output_energy
    return jnp.concatenate([*energies, output_energy[None]])


def unpack(net: PackedNetwork, activities: list, axis: int = 0) -> list[Array]:
    """The list of per-layer activities; a run's `n` arrays are one split along
    `axis` (the run's axis: 0 for a state, 1 for a trajectory)."""
    out = []
    for entry, a in zip(net.entries, activities):
        if isinstance(entry, Run):
            out.extend(split(a, axis))
        else:
            out.append(a)
    return out


def shapes(net: PackedNetwork, activities: list) -> list:
    """Per-layer placeholders (NumPy, never computed) for the shape checks."""
    out = []
    for entry, a in zip(net.entries, activities):
        count = entry.stop - entry.start if isinstance(entry, Run) else 1
        shape = a.shape[1:] if isinstance(entry, Run) else a.shape
        out.extend(np.empty(shape, a.dtype) for _ in range(count))
    return out


def elementwise(optim, net: PackedNetwork, activities: list) -> bool:
    """Whether `optim` updates a run's stacked activities as it would update its
    `n` arrays one by one (true of SGD, Adam and other elementwise optimisers; not
    of those that use a norm or the shape of each array).

    Checked on the run's own shapes by two updates with gradients of different
    scales per layer, evaluated when the step is traced (and remembered for the
    same optimiser and shapes); an optimiser that cannot be evaluated then (one
    closed over traced values) counts as not elementwise.
    """
    for entry, a in zip(net.entries, activities):
        if isinstance(entry, Run):
            key = (optim, a.shape, jnp.dtype(a.dtype))
            try:
                known = _ELEMENTWISE.get(key)
            except TypeError:  # an optimiser that cannot be hashed
                known, key = None, None
            if known is None:
                known = _probe(optim, a.shape, a.dtype)
                if key is not None:
                    if len(_ELEMENTWISE) >= 64:
                        _ELEMENTWISE.pop(next(iter(_ELEMENTWISE)))
                    _ELEMENTWISE[key] = known
            if not known:
                return False
    return True


_ELEMENTWISE: dict = {}


def _probe(optim, shape: tuple, dtype) -> bool:
    n = shape[0]
    rng = np.random.default_rng(0)
    scale = np.logspace(-2, 2, n).reshape((n,) + (1,) * (len(shape) - 1))
    params = rng.normal(size=shape).astype(dtype)
    grads = [(scale * rng.normal(size=shape)).astype(dtype) for _ in range(2)]
    try:
        with jax.ensure_compile_time_eval():
            stacked = _updates(optim, [params], [[g] for g in grads])[0]
            split = _updates(optim, list(params), [list(g) for g in grads])
    except Exception:  # not evaluable at trace time: keep the layers apart
        return False
    return bool(np.allclose(stacked, np.stack(split), rtol=1e-5, atol=0))


def _updates(optim, params: list, grads: list) -> list:
    state = optim.init(params)
    for g in grads:
        updates, state = optim.update(g, state, params)
    return [np.asarray(u) for u in updates]
