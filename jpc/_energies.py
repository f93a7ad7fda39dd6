"""The standard predictive-coding energy."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _packed
from ._checks import (
    LOSSES,
    check_activities,
    check_batch,
    check_model,
    check_option,
    check_shape,
    traced_floats,
)
from ._layers import (
    check_output,
    get_param_scalings,
    layer_inputs,
    layer_predictions,
    predict,
    skip_at,
    weight_matrices,
)
from ._types import Activities, Array, Float, LossId, Params, ParamType, Scalar
from ._utils import LOSS_FNS


# Keyword options of the energy passed traced to its compiled entry points (a new
# value does not recompile).
ENERGY_FLOATS = (
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
    "hidden_energy_scaling",
)


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


def regulariser(
    model: Any,
    free_activities: Activities,
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    batch: int | None = None,
) -> Any:
    r"""$\frac{\lambda_w}{2}\sum\lVert W\rVert^2 + \frac{\lambda_s}{2}\sum\lVert W^\top
    W - I\rVert^2 + \frac{\lambda_z}{2}\sum_l \mathrm{mean}_i\lVert z_{l,i}\rVert^2$.

    The sums run over the weights: every floating array leaf of `model` with at
    least two axes, at any depth and whatever its attribute is called (`weight`,
    `weight_ih`, `W1`, ...). Vectors, such as biases and the gains of
    `eqx.nn.LayerNorm`, are not weights and are left out, nor are biases stored
    with broadcasting axes (attributes named `bias…`, e.g. the `(out, 1, 1)`
    bias of `eqx.nn.Conv2d`). A kernel with more than
    two axes (e.g. a convolution's `(out, in, k, k)`) is read as the
    `(out, in·k·k)` matrix $W$, so $W^\top W$ is `(in·k·k, in·k·k)`. Terms whose
    coefficient is a literal `0` are left out of the program. `batch` is the batch
    size (default: the leading axis of the first free activity).
    """
    total = 0.0
    weights = weight_matrices(model)
    if not _is_zero(weight_decay):
        total += 0.5 * weight_decay * sum(jnp.sum(w**2) for w in weights)
    if not _is_zero(spectral_penalty):
        matrices = [jnp.reshape(w, (w.shape[0], -1)) for w in weights]
        total += (
            0.5
            * spectral_penalty
            * sum(
                jnp.sum((w.T @ w - jnp.eye(w.shape[1], dtype=w.dtype)) ** 2)
                for w in matrices
            )
        )
    if not _is_zero(activity_decay) and free_activities:
        batch = free_activities[0].shape[0] if batch is None else batch
        sq_norms = sum(jnp.sum(z**2) for z in free_activities)
        total += 0.5 * activity_decay * sq_norms / batch
    return total


def check_energy_inputs(
    params,
    activities,
    y,
    x,
    loss,
    param_type,
    names: tuple | None = None,
    prediction: Any = None,
) -> None:
    """Trace-time checks shared by every function of the standard PC energy.

    `names` is `(loss_name, y_name, x_name)`, the caller's own argument names (e.g.
    `("loss_id", "output", "input")`) used in the error messages. When the clamps
    are not called `y`/`x`, every layer's prediction shape is also checked here
    (with `jax.eval_shape`, so nothing is computed), since the energy itself would
    report a misfit under the names `y`/`x`; given the feedforward `prediction`
    of the last layer (whose pass checked the others), only `y` against it.
    """
    loss_name, y_name, x_name = ("loss", "y", "x") if names is None else names
    check_option(loss_name, loss, LOSSES)
    check_option("param_type", param_type, ("sp", "mupc", "ntp"))
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(
            "`params` must be the pair `(model, skip_model)`, got "
            f"{type(params).__name__}."
        )
    if isinstance(params[0], _packed.PackedNetwork):
        return  # stacked inside a training step, from checked inputs
    model, skip_model = params
    check_model(model, skip_model)
    check_activities(model, activities, supervised=x is not None)
    check_batch(y, x, activities, y_name, x_name)
    if prediction is not None:
        check_shape(y_name, y, prediction.shape, "the prediction of the last layer")
    elif (y_name, x_name) != ("y", "x"):
        _check_prediction_shapes(model, skip_model, activities, y, x, y_name, x_name)


def _check_prediction_shapes(model, skip_model, activities, y, x, y_name, x_name):
    """Shape-only pass over the layers (`jax.eval_shape`), naming the caller's args."""
    inputs, input_names = layer_inputs(activities, x)
    input_names = [x_name if n == "x" else n for n in input_names]
    targets = [*inputs[1:], y]
    target_names = [*input_names[1:], y_name]
    for i, layer in enumerate(model):
        skip = skip_at(skip_model, i)

        def prediction(z, layer=layer, skip=skip, name=input_names[i]):
            return predict(layer, skip, 1.0, z, name)

        shape = jax.eval_shape(prediction, inputs[i]).shape
        what = (
            "the prediction of the last layer"
            if i == len(model) - 1
            else f"the prediction of `model[{i}]`"
        )
        check_shape(target_names[i], targets[i], shape, what)


def layer_energies(
    params: Params,
    activities: Activities,
    y: Array,
    x: Array | None,
    loss: str,
    param_type: str,
    gamma: Any = None,
    output_energy_scaling: Any = None,
    hidden_energy_scaling: Any = None,
) -> list[Array] | Array:
    """Energies `[E_1, ..., E_L]` of each layer (batch means, no regulariser): a
    list of scalars, or one `(L,)` array for a `jpc._packed` network.

    The hidden terms `E_1..E_{L-1}` are weighted by the precisions
    `hidden_energy_scaling` (see `hidden_precisions`), the output term by
    `output_energy_scaling`.
    """
    model, skip_model = params
    if isinstance(model, _packed.PackedNetwork):
        kappas = hidden_precisions(hidden_energy_scaling, len(model) - 1)
        return _packed.layer_energies(
            model, activities, y, x, loss, output_energy_scaling, kappas
        )
    inputs, names = layer_inputs(activities, x)
    scalings = get_param_scalings(
        model, inputs[0], skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    preds = layer_predictions(model, skip_model, scalings, inputs, names)
    check_output(y, preds[-1])
    batch = y.shape[0]
    energies = []
    for i, (pred, z) in enumerate(zip(preds[:-1], inputs[1:])):
        if z.shape != pred.shape:
            raise ValueError(
                f"`{names[i + 1]}` has shape {z.shape} but `model[{i}]` predicts "
                f"shape {pred.shape}."
            )
        energies.append(0.5 * jnp.sum((z - pred) ** 2) / batch)
    kappas = hidden_precisions(hidden_energy_scaling, len(energies))
    energies = [e if k is None else k * e for e, k in zip(energies, kappas)]
    output_energy = LOSS_FNS[loss](preds[-1], y)
    if output_energy_scaling is not None:
        output_energy = output_energy_scaling * output_energy
    return [*energies, output_energy]


def hidden_precisions(hidden_energy_scaling: Any, n_hidden: int) -> list:
    r"""One precision $\kappa_l$ per hidden term (`None` where it is 1).

    `hidden_energy_scaling` is `None`, a scalar, or one value per hidden term (a
    sequence or a 1-D array of length `n_hidden`); see `check_hidden_scaling` for
    the checks made where the option enters.
    """
    if hidden_energy_scaling is None:
        return [None] * n_hidden
    if not _shape(hidden_energy_scaling):
        return [hidden_energy_scaling] * n_hidden
    return [hidden_energy_scaling[i] for i in range(n_hidden)]


def _shape(value: Any) -> tuple:
    """Shape of a number, an array or a sequence of numbers (read, not computed)."""
    if isinstance(value, (list, tuple)):
        return (len(value),)
    return tuple(getattr(value, "shape", ()))


def check_hidden_scaling(hidden_energy_scaling: Any, model: Any) -> None:
    """Trace-time check of `hidden_energy_scaling` against a model of `L` layers.

    A sequence or array must have one value per hidden term (`L - 1`); values
    known at trace time (Python numbers, concrete arrays) must be finite and
    positive.
    """
    value = hidden_energy_scaling
    if value is None:
        return
    n_hidden = len(model) - 1
    if isinstance(value, bool) or (
        not isinstance(value, (list, tuple))
        and not hasattr(value, "shape")
        and not isinstance(value, (int, float, np.number))
    ):
        raise TypeError(
            "`hidden_energy_scaling` must be None, a number or one number per hidden "
            f"term, got {type(value).__name__} {value!r:.60}."
        )
    if len(_shape(value)) > 1 or _shape(value) not in ((), (n_hidden,)):
        raise ValueError(
            f"`hidden_energy_scaling` must be a scalar or hold one value per hidden "
            f"term (L - 1 = {n_hidden} for a model of {len(model)} layers), got "
            f"shape {_shape(value)}."
        )
    try:
        values = np.asarray(value, dtype=float)
    except (
        TypeError,
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
    ):
        return  # traced: checked by the caller's own runtime checks, if any
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            "`hidden_energy_scaling` (the hidden precisions) must be finite and "
            f"positive, got {value!r:.80}."
        )


def energy_options(kw) -> tuple:
    """`(loss, param_type, gamma, output_energy_scaling, hidden_energy_scaling)`.

    The trailing positional arguments of [`layer_energies`][] and `infer_energies`,
    taken from a dict of the keyword options of the step helpers (or the unpacked
    `args` of the vector field).
    """
    return (
        kw["loss_id"],
        kw["param_type"],
        kw["gamma"],
        kw["output_energy_scaling"],
        kw.get("hidden_energy_scaling"),
    )


def make_energy_kwargs(
    loss_id: str,
    param_type: str,
    weight_decay: Any = 0.0,
    spectral_penalty: Any = 0.0,
    activity_decay: Any = 0.0,
    gamma: Any = None,
    output_energy_scaling: Any = None,
    hidden_energy_scaling: Any = None,
) -> dict:
    """The keyword options of the standard PC energy, as one dict.

    The dict that the step helpers pass on to the activity and parameter
    gradients (`**kw`), to inference and, through [`energy_options`][], to
    [`layer_energies`][].
    """
    return dict(
        loss_id=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )


def record_order(energies: list | Array) -> list | Array:
    """Reorder `[E_1, ..., E_L]` into the compatible `[E_L, E_2, ..., E_{L-1}, E_1]`."""
    if len(energies) == 1:
        return energies
    if isinstance(energies, jax.Array):
        return jnp.concatenate([energies[-1:], energies[1:-1], energies[:1]])
    return [energies[-1], *energies[1:-1], energies[0]]


def energy_vector(energies: list | Array) -> Array:
    """`[E_1, ..., E_L]` (a list of scalars, or one array already) as an array."""
    return energies if isinstance(energies, jax.Array) else jnp.stack(energies)


@traced_floats(*ENERGY_FLOATS)
def pc_energy_fn(
    params: Params,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    record_layers: bool = False,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, ""] | Float[Array, " layers"]:
    r"""Batch-mean predictive-coding energy $\mathcal{F}$.

    $$\mathcal{F} = \frac{1}{B}\sum_i\Big[\frac{\lambda}{2}\lVert y_i
    - a_L f_L(z_{L-1,i})\rVert^2 + \sum_{l<L}\frac{\kappa_l}{2}\lVert z_{l,i}
    - a_l f_l(z_{l-1,i})
    - s_l(z_{l-1,i})\rVert^2\Big] + R,$$

    with $z_0 = x$ when `x` is given (supervised) and a free latent otherwise.

    **Arguments:**

    - `params`: `(model, skip_model)`; `model` is a list of per-example layers.
    - `activities`: `[z_1, ..., z_L]` (supervised) or `[z_0, ..., z_L]`
        (unsupervised); the last entry is never read (the output is clamped to `y`).
    - `y`: target clamping the top layer, `(batch, ...)`.
    - `x`: optional input clamping the bottom layer; `None` for unsupervised.
    - `loss`: `"mse"` or `"ce"` (cross-entropy on the logits $a_L f_L$) output term.
    - `param_type`: `"sp"`, `"mupc"` or `"ntp"` (see [`jpc.get_param_scalings`][]).
    - `weight_decay`, `spectral_penalty`: coefficients of
        $\frac{1}{2}\sum\lVert W\rVert^2$ and $\frac{1}{2}\sum\lVert W^\top W -
        I\rVert^2$ over every weight in `model`: each floating array with at least
        two axes, however deeply nested and whatever it is called (a kernel with
        more axes is read as an `(out, rest)` matrix); vectors such as biases and
        LayerNorm gains, and `bias…` attributes of any shape, are not weights.
    - `activity_decay`: coefficient of $\frac{1}{2}\sum_l \mathrm{mean}_i
        \lVert z_{l,i}\rVert^2$ over the free activities.
    - `record_layers`: return the per-layer energies instead of their sum.
    - `gamma`: optional output scaling; $a_L$ is divided by it.
    - `output_energy_scaling`: output precision $\lambda$ (default 1).
    - `hidden_energy_scaling`: hidden precisions $\kappa_l$: `None` (every
        $\kappa_l = 1$), one number for every hidden term, or one value per hidden
        term (a sequence or array of length `L - 1`, layer order). Traced: a new
        value does not recompile. The μPC setting of Innocenti et al. (2025) for
        deep residual networks is $\lambda = \gamma^2 N L$, $\kappa_l = L$ (see
        the theory page).

    **Returns:**

    A scalar; with `record_layers=True`, an array of per-layer energies (each
    divided by `B`, regulariser excluded) ordered `[E_L, E_2, ..., E_{L-1}, E_1]`
    (output first, input last — the order of the JPC library).

    **Raises:**

    `ValueError` if `loss` or `param_type` is unknown, the list lengths do not
    match the model, batch and feature sizes do not fit, or
    `hidden_energy_scaling` has the wrong length or a value that is not finite and
    positive.
    """
    check_energy_inputs(params, activities, y, x, loss, param_type)
    check_hidden_scaling(hidden_energy_scaling, params[0])
    energies = layer_energies(
        params,
        activities,
        y,
        x,
        loss,
        param_type,
        gamma,
        output_energy_scaling,
        hidden_energy_scaling,
    )
    if record_layers:
        return energy_vector(record_order(energies))
    free = list(activities[:-1])
    if isinstance(params[0], _packed.PackedNetwork):
        # Inside a training step the weight terms are added to the parameters'
        # energy (`jpc._updates.param_step`); the run's activities are one array.
        reg = regulariser([], free, activity_decay=activity_decay, batch=y.shape[0])
    else:
        reg = regulariser(
            params[0], free, weight_decay, spectral_penalty, activity_decay
        )
    total = jnp.sum(energies) if isinstance(energies, jax.Array) else sum(energies)
    return total + reg
