"""DiMR model definitions (Flax NNX)."""
from dimr_jax.models.dimr import DiMR, decode_variant, model_spec_from_config, VARIANTS  # noqa: F401
