"""DiMR-L/3R on ImageNet 512 (latent 4x64x64). Size L is ours; third branch 192-d ConvNeXt x21 at 64x64.

Train:   python -m dimr_jax.main --config=configs/dimr_l_512.py --workdir=gs://BUCKET/dimr_l_512
Debug:   python -m dimr_jax.main --config=configs/dimr_l_512.py:runlocal --workdir=/tmp/dimr_l_512
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_l_512.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="L/3R", image_size=64), arg)
