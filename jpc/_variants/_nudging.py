r"""Nudged PC (Pinchetti et al., ICLR 2025 benchmark).

Instead of clamping the output with weight 1, the output energy is weighted by
$\pm\beta$ (times the user's `output_energy_scaling` $\lambda$, default 1):
$\mathcal{F}_{\pm\beta} = \sum_{l<L} E_l \pm \beta\lambda\,\ell(a_L f_L(z_{L-1}), y)$.
Inference finds the equilibrium of each phase from the same initial activities
(feedforward in the supervised case) and the parameter update is

| `nudging` | update |
|---|---|
| `"positive"` | $g(+\beta)/\beta$ |
| `"negative"` | $g(-\beta)/(-\beta)$ |
| `"centred"` | $(g(+\beta) - g(-\beta))/(2\beta)$ (equilibrium propagation) |

where $g(\pm\beta) = \partial\mathcal{F}_{\pm\beta}/\partial\theta$ at that phase's
equilibrium. In the supervised case $g(0) = 0$ (the feedforward state is the free
equilibrium), so each estimator tends to the backprop gradient of $\lambda\ell$ as
$\beta \to 0$, the centred one with an $O(\beta^2)$ instead of $O(\beta)$ bias.

The weight regularisers (`weight_decay`, `spectral_penalty`) do not depend on the
activities, so they are left out of the phase gradients and their gradient is
added once, unscaled. With `nudging="positive", beta=1` the update is exactly the
standard PC update.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._energies import regulariser
from .._grads import _param_value_and_grad
from .._jit import error_if
from ._common import optax_update


NUDGINGS = ("positive", "negative", "centred")
_SIGNS = {"positive": (1.0,), "negative": (-1.0,), "centred": (1.0, -1.0)}


def check_beta(beta) -> None:
    """`beta` must not be a literal zero (it divides the phase gradients)."""
    if isinstance(beta, bool) or not (
        isinstance(beta, (int, float)) or hasattr(beta, "dtype")
    ):
        raise TypeError(f"`beta` must be a float or a JAX scalar, got {beta!r}.")
    if isinstance(beta, (int, float)) and beta == 0:
        raise ValueError("`beta` must be non-zero for nudging, got 0.")


def _regulariser_grads(params, weight_decay, spectral_penalty):
    def reg(p):
        return jnp.asarray(regulariser(p[0], [], weight_decay, spectral_penalty))

    return eqx.filter_grad(reg)(tuple(params))


def nudged_param_step(
    run_inference,
    params,
    optim,
    opt_state,
    output,
    input,
    energy_kwargs: dict,
    nudging: str,
    beta,
):
    """Nudged phases, the combined gradient and one optax update (not jitted).

    `run_inference(energy_kwargs)` runs inference from the initial activities and
    returns a tuple whose second entry is the final state. Returns `(phases,
    energy, model, skip_model, grads, opt_state)`, where `phases` lists, per phase
    (the `+β` one first for `"centred"`), `(inference result,
    output_energy_scaling)`, and `energy` sums the phases' energies.
    """
    # A traced `beta` (every non-zero Python float is passed traced) can only be
    # checked at run time: a zero would silently turn the update into inf/NaN.
    beta = error_if(
        beta, jnp.asarray(beta) == 0, "make_pc_step: `beta` must be non-zero."
    )
    lam = energy_kwargs["output_energy_scaling"]
    lam = 1.0 if lam is None else lam
    phase_kwargs = dict(energy_kwargs, weight_decay=0.0, spectral_penalty=0.0)
    phase_kwargs.pop("loss_id")
    signs = _SIGNS[nudging]
    phases, grads, energy = [], None, 0.0
    for sign in signs:
        scaling = sign * beta * lam
        kwargs = dict(energy_kwargs, output_energy_scaling=scaling)
        inferred = run_inference(kwargs)
        final = inferred[1]
        phase_energy, phase_grads = _param_value_and_grad(
            tuple(params),
            final,
            output,
            x=input,
            loss=energy_kwargs["loss_id"],
            **dict(phase_kwargs, output_energy_scaling=scaling),
        )
        weight = 1 / (sign * beta * len(signs))
        phase_grads = jtu.tree_map(lambda g, w=weight: w * g, phase_grads)
        grads = (
            phase_grads if grads is None else jtu.tree_map(jnp.add, grads, phase_grads)
        )
        energy = energy + phase_energy
        phases.append((inferred, scaling))
    reg = _regulariser_grads(
        params, energy_kwargs["weight_decay"], energy_kwargs["spectral_penalty"]
    )
    grads = jtu.tree_map(jnp.add, grads, reg)
    (model, skip_model), opt_state = optax_update(
        tuple(params), grads, optim, opt_state
    )
    return phases, energy, model, skip_model, grads, opt_state
