"""DiMR-M/2R on ImageNet 256 (latent 4x32x32). Size M is ours (not in the paper): 512-d Transformer x17 + 256-d ConvNeXt x17.

Train:   python -m dimr_jax.main --config=configs/dimr_m_256.py --workdir=gs://BUCKET/dimr_m_256
Debug:   python -m dimr_jax.main --config=configs/dimr_m_256.py:runlocal --workdir=/tmp/dimr_m_256
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_m_256.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="M/2R", image_size=32), arg)
