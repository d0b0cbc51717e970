"""dimr_jax: DiMR (multi-resolution diffusion with Time-Dependent Layer Normalization) in JAX/Flax NNX.

Where things live:
  models/dimr.py    the network and its size table (decode_variant)
  models/layers.py  TD-LN, GEGLU MLP, attention, Transformer / ConvNeXt blocks
  diffusion.py      noise schedule and the multi-scale loss
  sampling.py       DPM-Solver++, DDPM, classifier-free guidance, sample_images
  train.py          train_and_evaluate: sharded train step, EMA, checkpoints, logging
  convert.py        official PyTorch checkpoints -> Flax
"""
__version__ = "0.1.0"
