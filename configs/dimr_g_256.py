"""DiMR-G/2R on ImageNet 256 (latent 4x32x32). The released config: 1.06B params, 331 GMACs; paper FID 1.63 (800 epochs, CFG).

Train:   python -m dimr_jax.main --config=configs/dimr_g_256.py --workdir=gs://BUCKET/dimr_g_256
Debug:   python -m dimr_jax.main --config=configs/dimr_g_256.py:runlocal --workdir=/tmp/dimr_g_256
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_g_256.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  return config_base.with_arg(config_base.base(variant="G/2R", image_size=32), arg)
