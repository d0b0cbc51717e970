"""DiMR-G/3R on ImageNet 512 (latent 4x64x64). G/2R + a 288-d ConvNeXt branch at 64x64: the third branch is ours (no G/3R was released).

Train:   python -m dimr_jax.main --config=configs/dimr_g_512.py --workdir=gs://BUCKET/dimr_g_512
Debug:   python -m dimr_jax.main --config=configs/dimr_g_512.py:runlocal --workdir=/tmp/dimr_g_512
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_g_512.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="G/3R", image_size=64), arg)
