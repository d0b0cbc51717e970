"""DiMR-XL/2R on ImageNet 256 (latent 4x32x32). The released config: 505M params, 160 GMACs; paper FID 1.70 (800 epochs, CFG).

Train:   python -m dimr_jax.main --config=configs/dimr_xl_256.py --workdir=gs://BUCKET/dimr_xl_256
Debug:   python -m dimr_jax.main --config=configs/dimr_xl_256.py:runlocal --workdir=/tmp/dimr_xl_256
Summary: python -m dimr_jax.tools.summary --config=configs/dimr_xl_256.py
"""
from dimr_jax import config_base


def get_config(arg=None):
  config = config_base.base(variant="XL/2R", image_size=32)
  if arg == "runlocal":  # same model, tiny batch, frequent logs: checks a real size compiles and steps
    config.input.dataset = "synthetic"
    config.input.batch_size = 8
    config.total_steps = 10
    config.log_every = 2
    config.ckpt_every = 5
    config.sample_every = 0
    config.evals.fid_every = 0
  return config
