r"""Activity steps stated per example, independent of the batch size.

The energies of `jpc` are batch means, $\mathcal{F} = \frac{1}{B}\sum_i
\mathcal{F}_i$, so the gradient with respect to one example's activity is
$\partial\mathcal{F}/\partial z_{l,i} = \frac{1}{B}\,\partial\mathcal{F}_i/\partial
z_{l,i}$: an activity SGD step with learning rate $\eta$ moves each example by only
$\eta/B$ times its own prediction error, and the same $\eta$ means a different
inference at every batch size. [`jpc.per_example`][] states the step for one example
instead.
"""

from typing import Any, NamedTuple

import jax
import optax


class ScaleByBatchSizeState(NamedTuple):
    """[`jpc.scale_by_batch_size`][] keeps no state."""


def scale_by_batch_size() -> optax.GradientTransformation:
    r"""Multiply each update by the size of its leading (batch) axis.

    Turns the gradient of a batch-mean energy into the per-example gradients
    $\partial\mathcal{F}_i/\partial z_{l,i}$, stacked. Scalars (no batch axis) pass
    unchanged. Usually used through [`jpc.per_example`][].

    **Returns:**

    An `optax.GradientTransformation` without state.
    """

    def init_fn(params: Any) -> ScaleByBatchSizeState:
        del params
        return ScaleByBatchSizeState()

    def update_fn(updates, state, params=None):
        del params

        def scale(u):
            return u if u is None or u.ndim == 0 else u * u.shape[0]

        return jax.tree_util.tree_map(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def per_example(optim: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""An activity optimiser whose step is stated per example.

    `per_example(optax.sgd(eta))` moves every example's activity by
    $\eta\,\partial\mathcal{F}_i/\partial z_{l,i}$, i.e. by $\eta$ times its own
    prediction errors, whatever the batch size $B$: it is `optax.sgd(eta * B)` on the
    batch-mean energy, with $B$ read from the activities. A hidden term with
    precision $\kappa_l$ (`hidden_energy_scaling`, default 1) moves $z_l$ by
    $\eta\kappa_l$ times its own error, so with $\eta\kappa_l \le 1$ a step never
    overshoots that term ($\eta\kappa_l = 1$ moves $z_l$ exactly onto its
    prediction when the term is alone).
    Optimisers that normalise their updates (Adam, RMSProp) are unaffected by the
    factor except through their `eps`.

    Pass it as `activity_optim` to [`jpc.make_pc_step`][] and the other steps, or to
    [`jpc.update_pc_activities`][]; build it once, outside the training loop (a new
    optimiser object is a new compiled program).

    **Arguments:**

    - `optim`: any optax optimiser for the activities.

    **Returns:**

    `optax.chain(jpc.scale_by_batch_size(), optim)`.

    **Raises:**

    `TypeError` if `optim` is not an `optax.GradientTransformation`.

    **Example:**

    ```python
    activity_optim = jpc.per_example(optax.sgd(0.5))  # half the error, per example
    result = jpc.make_pc_step(
        model, optim, opt_state, y, input=x,
        activity_optim=activity_optim, n_inference_steps=20,
    )
    ```
    """
    if not isinstance(optim, optax.GradientTransformation):
        raise TypeError(
            "`optim` must be an optax optimiser (an `optax.GradientTransformation`), "
            f"got {type(optim).__name__}."
        )
    return optax.chain(scale_by_batch_size(), optim)
