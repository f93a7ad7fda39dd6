r"""Zero-divergence inference learning, Z-IL (Song et al. 2020).

Start from a feedforward pass, where every hidden error is zero. Inference step
$t = 0, \dots, L-1$ reads the parameter gradient of layer $L-t$ at the current
state, then moves only the hidden activity $z_{L-t-1}$ by $-B\,\partial\mathcal{F}
/\partial z_{L-t-1}$ (a step of $B$ under the batch-mean convention, i.e. each
example moves by its own error gradient). Errors then travel down one layer per
step, and at step $t$ the error of layer $L-t$ equals backprop's delta while the
layer's input is still feedforward, so each layer's gradient equals the backprop
gradient of the batch-mean output loss exactly.

A layer's parameters are not read by any later step of the sweep, so the layer
gradients are collected and applied in one `optim` update (the same, for SGD, as
updating each layer at its own step; for stateful optimisers one step per batch).
With `hybrid_steps=K` the sweep is followed by `K` ordinary inference steps with
`activity_optim` from the swept state, under the updated parameters, and one more
full PC parameter update (the hybrid of PCX's Z-IL tutorial).
"""

from typing import Any

import equinox as eqx
import optax

from .._checks import LOSSES, check_batch, check_model, check_opt_state, check_option
from .._energies import pc_energy_fn
from .._jit import filter_jit
from .._layers import with_layers
from .._train import BPStepResult, initial_activities
from .._types import Array, Float, LossId, Model, ParamType, SkipModel
from .._updates import discrete_inference, param_step
from .._utils import LOSS_FNS
from ._common import optax_update


def _energy_grads(params, activities, y, x, loss_id, param_type):
    def energy(state):
        return pc_energy_fn(*state, y, x=x, loss=loss_id, param_type=param_type)

    return eqx.filter_grad(energy)((tuple(params), list(activities)))


def _layer_entries(tree, grads_by_step, n_layers):
    """Entry `k` of `tree`'s gradient from the step that reads layer `k`."""
    if tree is None:
        return None
    return with_layers(
        tree, [grads_by_step[n_layers - 1 - k][k] for k in range(n_layers)]
    )


def zil_sweep(params, activities, y, x, loss_id, param_type) -> tuple[Any, list]:
    """The Z-IL sweep; returns the backprop-equal gradients and the swept activities."""
    n_layers = len(params[0])
    batch = y.shape[0]
    activities = list(activities)
    model_grads, skip_grads = [], []
    for t in range(n_layers):
        layer = n_layers - 1 - t
        (g_model, g_skip), g_activities = _energy_grads(
            params, activities, y, x, loss_id, param_type
        )
        model_grads.append(g_model)
        skip_grads.append(g_skip)
        if layer >= 1:
            activities[layer - 1] = (
                activities[layer - 1] - batch * g_activities[layer - 1]
            )
    grads = (
        _layer_entries(params[0], model_grads, n_layers),
        _layer_entries(params[1], skip_grads, n_layers),
    )
    return grads, activities


def _check_zil_options(input, hybrid_steps, activity_optim) -> None:
    if input is None:
        raise ValueError(
            "Z-IL is supervised: `input` must be given (feedforward initialisation), "
            "got `input=None`."
        )
    if (
        isinstance(hybrid_steps, bool)
        or not isinstance(hybrid_steps, int)
        or hybrid_steps < 0
    ):
        raise ValueError(
            f"`hybrid_steps` must be a non-negative integer, got {hybrid_steps!r}."
        )
    if hybrid_steps > 0 and activity_optim is None:
        raise ValueError(
            f"`hybrid_steps={hybrid_steps}` needs an `activity_optim` for the extra "
            "inference steps, got `activity_optim=None`."
        )


@filter_jit
def make_zil_step(
    model: Model,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."],
    loss_id: LossId = "mse",
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    hybrid_steps: int = 0,
    activity_optim: optax.GradientTransformation | None = None,
) -> BPStepResult:
    """One Z-IL training step (optionally the Z-IL/PC hybrid).

    With `hybrid_steps=0` and `optim=optax.sgd(lr)` the parameters change by
    exactly `-lr` times the backprop gradient of the batch-mean output loss.

    **Arguments:**

    - `model`, `skip_model`, `param_type`: the network, as for
        [`jpc.make_pc_step`][].
    - `optim`, `opt_state`: parameter optimiser and its state,
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`.
    - `output`, `input`: targets and data (`input` is required).
    - `loss_id`: `"mse"` or `"ce"`.
    - `hybrid_steps`: number `K` of ordinary inference steps after the sweep,
        followed by a second (PC) parameter update; 0 for pure Z-IL.
    - `activity_optim`: optimiser of those `K` steps (required when `K > 0`).

    **Returns:**

    A dict with the updated `model`, `skip_model`, `opt_state` and the `loss` of
    the feedforward prediction before the update.

    **Raises:**

    `ValueError` for an unknown `loss_id`, a missing `input`, a negative
    `hybrid_steps` or a missing `activity_optim`.
    """
    check_option("loss_id", loss_id, LOSSES)
    check_model(model, skip_model)
    check_opt_state(optim, opt_state, (model, skip_model))
    _check_zil_options(input, hybrid_steps, activity_optim)
    check_batch(output, input, [], y_name="output", x_name="input")
    activities, prediction = initial_activities(
        model, skip_model, output, input, param_type, None, (None,) * 4
    )
    params = (model, skip_model)
    grads, activities = zil_sweep(
        params, activities, output, input, loss_id, param_type
    )
    params, opt_state = optax_update(params, grads, optim, opt_state)
    if hybrid_steps > 0:
        kw = dict(
            loss_id=loss_id,
            param_type=param_type,
            weight_decay=0.0,
            spectral_penalty=0.0,
            activity_decay=0.0,
            gamma=None,
            output_energy_scaling=None,
        )
        final, _ = discrete_inference(
            params, activities, activity_optim, hybrid_steps, output, input, False, **kw
        )
        _, *params, _, opt_state = param_step(
            params, final, optim, opt_state, output, input, **kw
        )
    return BPStepResult(
        model=params[0],
        skip_model=params[1],
        opt_state=opt_state,
        loss=LOSS_FNS[loss_id](prediction, output),
    )
