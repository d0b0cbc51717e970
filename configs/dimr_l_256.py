"""DiMR-L/2R on ImageNet 256 (latent 4x32x32). Size L is ours (not in the paper): 768-d Transformer x25 + 384-d ConvNeXt x21.

Train:   python -m dimr_jax.main --config=configs/dimr_l_256.py --workdir=gs://BUCKET/dimr_l_256
Debug:   python -m dimr_jax.main --config=configs/dimr_l_256.py:runlocal --workdir=/tmp/dimr_l_256
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_l_256.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="L/2R", image_size=32), arg)
