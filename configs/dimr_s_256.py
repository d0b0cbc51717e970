"""DiMR-S/2R on ImageNet 256 (latent 4x32x32). Size S is ours (not in the paper): 384-d Transformer x13 + 192-d ConvNeXt x13.

Train:   python -m dimr_jax.main --config=configs/dimr_s_256.py --workdir=gs://BUCKET/dimr_s_256
Debug:   python -m dimr_jax.main --config=configs/dimr_s_256.py:runlocal --workdir=/tmp/dimr_s_256
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_s_256.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="S/2R", image_size=32), arg)
