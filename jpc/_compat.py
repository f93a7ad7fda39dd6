"""A check of the installed jaxlib, run once when `jpc` is imported."""

import importlib.metadata
import os
import warnings


# Releases whose CPU backend computes some of `jpc`'s reductions wrongly, with the
# XLA flag that avoids the fault.
_FAULTY = {
    "0.10.2": (
        "https://github.com/jax-ml/jax/issues/39103",
        "--xla_cpu_experimental_ynn_fusion_type=-reduce",
    )
}


def check_jaxlib() -> None:
    """Warn when the installed jaxlib is a release with a known CPU miscompile.

    `jpc`'s requirements exclude these releases, but an environment can hold one
    anyway (installed without dependencies, by conda, or with `jax[cuda12]`, which
    pins jaxlib to jax's own version). Setting the named flag in `XLA_FLAGS`
    before JAX starts silences the warning, as it avoids the fault.
    """
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if version not in _FAULTY:
        return
    issue, flag = _FAULTY[version]
    if flag in os.environ.get("XLA_FLAGS", ""):
        return
    warnings.warn(
        f"jaxlib {version} miscompiles, on the CPU backend, some reductions that "
        "XLA fuses with the matrix product before them, and returns wrong values "
        f"without an error ({issue}); PC energies and the steady-state stop have "
        f"that form. Install another jaxlib (`pip install 'jaxlib!={version}'`), or "
        f"set XLA_FLAGS={flag} before JAX starts.",
        UserWarning,
        stacklevel=2,
    )


def jax_versions() -> str:
    """`"JAX <version> (jaxlib <version>)"`, for the records of experiments."""
    import jax

    return f"JAX {jax.__version__} (jaxlib {importlib.metadata.version('jaxlib')})"


def jax_info() -> dict:
    """JAX's and jaxlib's versions and the default backend, for result records."""
    import jax

    version = importlib.metadata.version("jaxlib")
    return {
        "version": jax.__version__,
        "jaxlib": version,
        "backend": jax.default_backend(),
    }
