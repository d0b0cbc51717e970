"""DiMR-XL/3R on ImageNet 512 (latent 4x64x64). Inferred config (spec 1.2): XL/2R + a 240-d ConvNeXt branch at 64x64; 525.03M params, 206.1 GMACs (paper: 525M / 206, FID 2.89). Loss coefficients [1/16, 1/4, 1] are ours (not released).

Train:   python -m dimr_jax.main --config=configs/dimr_xl_512.py --workdir=gs://BUCKET/dimr_xl_512
Debug:   python -m dimr_jax.main --config=configs/dimr_xl_512.py:runlocal --workdir=/tmp/dimr_xl_512
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_xl_512.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="XL/3R", image_size=64), arg)
