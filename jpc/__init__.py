"""`jpc`: a functional JAX toolkit for predictive coding networks."""

import importlib.metadata

from . import _compat, datasets as datasets
from ._checkpoint import (
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._checks import _check_param_type as _check_param_type
from ._diagnostics import (
    compare_to_backprop as compare_to_backprop,
    compute_grad_cosine_similarity as compute_grad_cosine_similarity,
    compute_grad_snr as compute_grad_snr,
    compute_layer_grad_variance_ratios as compute_layer_grad_variance_ratios,
    compute_layer_learning as compute_layer_learning,
    compute_per_example_grads as compute_per_example_grads,
)
from ._energies import pc_energy_fn as pc_energy_fn
from ._epoch import run_steps as run_steps
from ._eval import (
    compute_infer_energies as compute_infer_energies,
    test_discriminative_pc as test_discriminative_pc,
    test_generative_pc as test_generative_pc,
)
from ._grads import (
    compute_pc_activity_grad as compute_pc_activity_grad,
    compute_pc_param_grads as compute_pc_param_grads,
    neg_pc_activity_grad as neg_pc_activity_grad,
)
from ._infer import (
    InferenceInfo as InferenceInfo,
    solve_inference as solve_inference,
)
from ._init import (
    init_activities_from_normal as init_activities_from_normal,
    init_activities_with_ffwd as init_activities_with_ffwd,
)
from ._jit import (
    raise_pending_step_errors as raise_pending_step_errors,
    set_step_error_timing as set_step_error_timing,
)
from ._layer_learning import (
    LayerLearning as LayerLearning,
    format_layer_learning as format_layer_learning,
)
from ._layers import (
    get_param_scalings as get_param_scalings,
)
from ._packed import set_layer_stacking as set_layer_stacking
from ._perturbation import (
    compute_np_param_grads as compute_np_param_grads,
    compute_wp_param_grads as compute_wp_param_grads,
)
from ._rules import (
    compute_fa_param_grads as compute_fa_param_grads,
    compute_kp_updates as compute_kp_updates,
    init_feedback_weights as init_feedback_weights,
)
from ._sharding import (
    make_data_mesh as make_data_mesh,
    replicate as replicate,
    shard_batch as shard_batch,
)
from ._step_size import (
    per_example as per_example,
    scale_by_batch_size as scale_by_batch_size,
)
from ._theory import (
    compute_linear_equilib_energy_grads as compute_linear_equilib_energy_grads,
    compute_linear_equilib_rescaling as compute_linear_equilib_rescaling,
    linear_equilib_energy as linear_equilib_energy,
    update_linear_equilib_energy_params as update_linear_equilib_energy_params,
)
from ._theory_hessian import (
    compute_linear_activity_hessian as compute_linear_activity_hessian,
    compute_linear_activity_solution as compute_linear_activity_solution,
)
from ._train import make_bp_step as make_bp_step, make_pc_step as make_pc_step
from ._updates import (
    update_pc_activities as update_pc_activities,
    update_pc_params as update_pc_params,
)
from ._utils import (
    compute_accuracy as compute_accuracy,
    compute_activity_norms as compute_activity_norms,
    compute_param_norms as compute_param_norms,
    cross_entropy_loss as cross_entropy_loss,
    get_act_fn as get_act_fn,
    get_t_max as get_t_max,
    make_mlp as make_mlp,
    make_skip_model as make_skip_model,
    mse_loss as mse_loss,
)
from ._variants._bidirectional import (
    bpc_energy_fn as bpc_energy_fn,
    compute_bpc_activity_grad as compute_bpc_activity_grad,
    compute_bpc_param_grads as compute_bpc_param_grads,
    update_bpc_activities as update_bpc_activities,
    update_bpc_params as update_bpc_params,
)
from ._variants._bregman import (
    bregman_from_preact as bregman_from_preact,
    bregman_pc_energy_fn as bregman_pc_energy_fn,
    bregman_phi as bregman_phi,
    compute_bregman_pc_activity_grad as compute_bregman_pc_activity_grad,
    compute_bregman_pc_param_grads as compute_bregman_pc_param_grads,
    init_bregman_pc_activities as init_bregman_pc_activities,
    update_bregman_pc_activities as update_bregman_pc_activities,
    update_bregman_pc_params as update_bregman_pc_params,
)
from ._variants._dendrites import (
    compute_pdm_activity_grad as compute_pdm_activity_grad,
    compute_pdm_param_grads as compute_pdm_param_grads,
    pdm_energy_fn as pdm_energy_fn,
    update_pdm_activities as update_pdm_activities,
    update_pdm_params as update_pdm_params,
)
from ._variants._error import (
    compute_epc_error_grad as compute_epc_error_grad,
    compute_epc_param_grads as compute_epc_param_grads,
    epc_energy_fn as epc_energy_fn,
    init_epc_errors as init_epc_errors,
    update_epc_errors as update_epc_errors,
    update_epc_params as update_epc_params,
)
from ._variants._hybrid import (
    compute_hpc_param_grads as compute_hpc_param_grads,
    hpc_energy_fn as hpc_energy_fn,
    init_activities_with_amort as init_activities_with_amort,
    make_hpc_step as make_hpc_step,
    test_hpc as test_hpc,
)
from ._variants._incremental import make_ipc_step as make_ipc_step
from ._variants._mcpc import (
    make_mcpc_step as make_mcpc_step,
    sample_generative_pc as sample_generative_pc,
)
from ._variants._zil import make_zil_step as make_zil_step
from ._vit import (
    ClassificationHead as ClassificationHead,
    PatchEmbedding as PatchEmbedding,
    TransformerBlock as TransformerBlock,
    make_vit as make_vit,
)


_get_param_scalings = get_param_scalings
__version__ = importlib.metadata.version("jpc")
_compat.check_jaxlib()
