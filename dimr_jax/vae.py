"""The Stable Diffusion KL-f8 autoencoder in Flax NNX (NHWC), loaded from LDM or diffusers weights.

DiMR (like U-ViT) trains in the latent space of the SD v1 VAE: ImageNet images are encoded once
into posterior "moments" (mean and logvar, 8 channels), training samples a fresh latent from them
at every step, and samples are decoded back to pixels. This module mirrors the official
``libs/autoencoder.py`` (``FrozenAutoencoderKL`` built by ``get_model``):

  * ``encode_moments(x) = quant_conv(encoder(x))``: NHWC images in [-1, 1] -> NHWC moments,
    channels ``[mean | logvar]``.
  * ``sample(moments, key) = SCALE_FACTOR * (mean + exp(0.5 * clip(logvar, -30, 20)) * eps)``: the
    scale is applied after sampling, and the logvar is clamped first.
  * ``decode(z) = decoder(post_quant_conv(float32(1 / SCALE_FACTOR) * z))``: a multiplication by the
    float32 inverse, not a division (they differ by one ulp on some entries), no clamp or tanh.

The scale factor lives only in :data:`SCALE_FACTOR`; everything else in the project takes and returns
scaled latents (what the diffusion model sees).

Weights are read without torch (``dimr_jax.weights.load_state_dict``) from either naming, detected
from the keys:

  * LDM / CompVis (U-ViT's ``autoencoder_kl.pth`` / ``autoencoder_kl_ema.pth``):
    ``encoder.down.0.block.0.norm1.weight``, ``encoder.mid.attn_1.q.weight`` (1x1 conv), ``quant_conv``.
  * diffusers ``AutoencoderKL`` (``diffusion_pytorch_model.safetensors``):
    ``encoder.down_blocks.0.resnets.0.norm1.weight``, ``encoder.mid_block.attentions.0.to_q.weight``
    (Linear) or the pre-0.14 ``query/key/value/proj_attn`` names; ``decoder.up_blocks.k`` is LDM's
    ``decoder.up.{L-1-k}`` (diffusers stores the decoder levels in processing order).

Loading is strict: every key must be consumed and every parameter filled with the right shape,
otherwise :class:`WeightLoadError` lists the missing keys, the unexpected keys and the shape
mismatches. The architecture is sized from the weights, so variants other than SD's (other widths,
depths, number of levels, attention levels) load without a hand-written config.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimr_jax import weights

__all__ = [
    "SCALE_FACTOR", "VAEConfig", "AutoencoderKL", "FrozenAutoencoderKL", "WeightLoadError",
    "load_autoencoder", "build_abstract", "ldm_state_dict_shapes", "config_from_state_dict",
    "detect_naming", "ldm_key_to_diffusers", "diffusers_key_to_ldm", "ldm_to_diffusers",
    "diffusers_to_ldm", "params_from_ldm", "sample_latents", "source_sha256",
]

# The one place the SD latent scale lives (LDM ``scale_factor``, diffusers ``scaling_factor``).
SCALE_FACTOR = 0.18215
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of the KL autoencoder; the defaults are SD v1 KL-f8 (``get_model`` ddconfig).

  ``resolution`` only matters through ``attn_resolutions`` (as in LDM: a level ``i`` works at
  ``resolution // 2**i`` and gets attention blocks if that is listed); the network itself is fully
  convolutional and accepts any H, W divisible by ``2**(len(ch_mult) - 1)``.
  """
  in_channels: int = 3
  out_ch: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int = 4
  double_z: bool = True
  resolution: int = 256
  attn_resolutions: tuple[int, ...] = ()
  num_groups: int = 32
  eps: float = 1e-6
  # Matmul/conv precision. None is the backend default (TF32 on recent NVIDIA GPUs, the same as
  # torch's cudnn default the official features were made with); 'highest' for exact float32.
  precision: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if not self.double_z:
      raise ValueError("the KL autoencoder needs double_z=True (the encoder emits mean and logvar)")
    for m in self.ch_mult:
      if (self.ch * m) % self.num_groups:
        raise ValueError(f"channels {self.ch * m} not divisible by num_groups={self.num_groups}")

  @classmethod
  def from_ldm(cls, ddconfig: Mapping[str, Any], embed_dim: int = 4, **overrides) -> "VAEConfig":
    """Builds a config from LDM's ``ddconfig`` dict (e.g. the fixture's ``get_model_ddconfig``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ddconfig.items() if k in names}
    return cls(embed_dim=embed_dim, **kw, **overrides)

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (self.num_levels - 1)

  def has_attn(self, level: int) -> bool:
    return self.resolution // 2**level in self.attn_resolutions


class WeightLoadError(ValueError):
  """Raised when a checkpoint does not fill the autoencoder exactly (no silent partial loads)."""


# ------------------------------------------------------------------------------------------------
# Modules. Attribute names mirror the LDM state-dict names, so a parameter path IS its LDM key
# (``encoder/down/0/block/0/conv1/kernel`` <-> ``encoder.down.0.block.0.conv1.weight``).
# ------------------------------------------------------------------------------------------------


def _conv(cin, cout, k, cfg, rngs, stride=1, padding="SAME"):
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, precision=cfg.precision,
                  rngs=rngs)


def _norm(c, cfg, rngs):
  # Exact two-pass variance: the fast E[x^2]-E[x]^2 form loses digits on large activations, and
  # the moments must match torch to 1e-5.
  return nnx.GroupNorm(c, num_groups=cfg.num_groups, epsilon=cfg.eps, use_fast_variance=False,
                       rngs=rngs)


class ResnetBlock(nnx.Module):
  """LDM ResnetBlock without time embedding: x + conv2(swish(norm2(conv1(swish(norm1(x))))))."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, cfg, rngs)
    self.conv1 = _conv(cin, cout, 3, cfg, rngs)
    self.norm2 = _norm(cout, cfg, rngs)
    self.conv2 = _conv(cout, cout, 3, cfg, rngs)
    # LDM uses a 1x1 "nin_shortcut" when channels change (diffusers: conv_shortcut).
    self.nin_shortcut = _conv(cin, cout, 1, cfg, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(nnx.swish(self.norm2(h)))  # dropout p=0 in the frozen VAE
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with 1x1-conv projections (LDM AttnBlock)."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.norm = _norm(c, cfg, rngs)
    self.q = _conv(c, c, 1, cfg, rngs)
    self.k = _conv(c, c, 1, cfg, rngs)
    self.v = _conv(c, c, 1, cfg, rngs)
    self.proj_out = _conv(c, c, 1, cfg, rngs)
    self.precision = cfg.precision

  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = self.norm(x)
    q = self.q(h).reshape(b, hh * ww, c)
    k = self.k(h).reshape(b, hh * ww, c)
    v = self.v(h).reshape(b, hh * ww, c)
    w = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision) * (int(c) ** -0.5)
    w = jax.nn.softmax(w, axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v, precision=self.precision).reshape(b, hh, ww, c)
    return x + self.proj_out(h)


class Downsample(nnx.Module):
  """Zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv (LDM; not symmetric padding)."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, cfg, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, c: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = _conv(c, c, 3, cfg, rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution level: ResnetBlocks (with attention where configured), then a resampler."""

  def __init__(self, cin, cout, n_blocks, attn, resample, cfg, *, rngs):
    blocks, attns = [], []
    for _ in range(n_blocks):
      blocks.append(ResnetBlock(cin, cout, cfg, rngs=rngs))
      cin = cout
      if attn:
        attns.append(AttnBlock(cout, cfg, rngs=rngs))
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.downsample = Downsample(cout, cfg, rngs=rngs) if resample == "down" else None
    self.upsample = Upsample(cout, cfg, rngs=rngs) if resample == "up" else None

  def __call__(self, x):
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class Mid(nnx.Module):
  """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

  def __init__(self, c, cfg, *, rngs):
    self.block_1 = ResnetBlock(c, c, cfg, rngs=rngs)
    self.attn_1 = AttnBlock(c, cfg, rngs=rngs)
    self.block_2 = ResnetBlock(c, c, cfg, rngs=rngs)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
  """Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 * z_channels)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, cfg, rngs)
    in_mult = (1,) + cfg.ch_mult
    levels = []
    for i, m in enumerate(cfg.ch_mult):
      levels.append(Level(cfg.ch * in_mult[i], cfg.ch * m, cfg.num_res_blocks, cfg.has_attn(i),
                          "down" if i != cfg.num_levels - 1 else None, cfg, rngs=rngs))
    self.down = nnx.List(levels)
    c = cfg.ch * cfg.ch_mult[-1]
    self.mid = Mid(c, cfg, rngs=rngs)
    self.norm_out = _norm(c, cfg, rngs)
    self.conv_out = _conv(c, 2 * cfg.z_channels, 3, cfg, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latents (B, h, w, z_channels) -> images (B, h*f, w*f, out_ch); ``up[i]`` is level i, run i=L-1..0."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    c = cfg.ch * cfg.ch_mult[-1]
    self.conv_in = _conv(cfg.z_channels, c, 3, cfg, rngs)
    self.mid = Mid(c, cfg, rngs=rngs)
    levels = [None] * cfg.num_levels
    for i in reversed(range(cfg.num_levels)):
      cout = cfg.ch * cfg.ch_mult[i]
      levels[i] = Level(c, cout, cfg.num_res_blocks + 1, cfg.has_attn(i),
                        "up" if i != 0 else None, cfg, rngs=rngs)
      c = cout
    self.up = nnx.List(levels)
    self.norm_out = _norm(c, cfg, rngs)
    self.conv_out = _conv(c, cfg.out_ch, 3, cfg, rngs)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
  """Encoder + quant convs. Methods take and return NHWC arrays; latents are SCALED."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, cfg, rngs)
    self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, cfg, rngs)

  def encode_moments(self, x):
    """NHWC images in [-1, 1] -> NHWC moments ``[mean | logvar]`` (2 * embed_dim channels)."""
    return self.quant_conv(self.encoder(x))

  def decode(self, z):
    """Scaled NHWC latents -> NHWC images (roughly [-1, 1], not clamped)."""
    z = jnp.asarray(z, jnp.float32) * np.float32(1.0 / SCALE_FACTOR)
    return self.decoder(self.post_quant_conv(z))


def sample_latents(moments, key):
  """Scaled latents from posterior moments: ``SCALE_FACTOR * (mean + std * eps)``, logvar clamped."""
  moments = jnp.asarray(moments, jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  std = jnp.exp(0.5 * jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))
  eps = jax.random.normal(key, mean.shape, mean.dtype)
  return SCALE_FACTOR * (mean + std * eps)


# Pure functions of (graphdef, params, inputs): jit caches are shared between loaded autoencoders
# of one architecture, and ingestion can jit them again with its own shardings.
def encode_moments_fn(graphdef, params, x):
  return nnx.merge(graphdef, params).encode_moments(jnp.asarray(x, jnp.float32))


def decode_fn(graphdef, params, z):
  return nnx.merge(graphdef, params).decode(z)


_encode_moments_jit = jax.jit(encode_moments_fn, static_argnums=0)
_decode_jit = jax.jit(decode_fn, static_argnums=0)
_sample_jit = jax.jit(sample_latents)


class FrozenAutoencoderKL:
  """A loaded, frozen autoencoder: the API the rest of the project uses (all methods jitted).

  Attributes: ``config``, ``graphdef`` and ``params`` (for custom jits, e.g. sharded ingestion),
  ``naming`` ('ldm' or 'diffusers', as detected) and ``sha256`` of the weight source.
  """

  def __init__(self, graphdef, params, config: VAEConfig, naming: str = "ldm", sha256: str = ""):
    self.graphdef, self.params, self.config = graphdef, params, config
    self.naming, self.sha256 = naming, sha256

  @property
  def scale_factor(self) -> float:
    return SCALE_FACTOR

  def encode_moments(self, x):
    """NHWC images in [-1, 1] -> NHWC moments (B, H/f, W/f, 2*embed_dim): mean then logvar."""
    return _encode_moments_jit(self.graphdef, self.params, x)

  def sample(self, moments, key):
    """Scaled latents ``0.18215 * (mean + exp(0.5 * clip(logvar, -30, 20)) * eps)``."""
    return _sample_jit(moments, key)

  def encode(self, x, key):
    """Stochastic encoding to scaled latents (``sample(encode_moments(x))``)."""
    return self.sample(self.encode_moments(x), key)

  def decode(self, z):
    """Scaled NHWC latents -> NHWC images (multiplied by float32(1/0.18215) first)."""
    return _decode_jit(self.graphdef, self.params, z)

  def module(self) -> AutoencoderKL:
    """The NNX module with the loaded weights (for use inside other NNX code)."""
    return nnx.merge(self.graphdef, self.params)


# ------------------------------------------------------------------------------------------------
# Parameter paths <-> LDM keys.
# ------------------------------------------------------------------------------------------------


def build_abstract(cfg: VAEConfig) -> AutoencoderKL:
  """The module with ShapeDtypeStruct leaves: no memory, no random init."""
  return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))


def _flat(tree, prefix=()):
  """Flattens a nested pure dict (as from nnx.to_pure_dict) to {path_tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflat(flat):
  out = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _path_to_ldm(path) -> str:
  return ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_TORCH[path[-1]]


def _torch_shape(leaf_name, shape):
  shape = tuple(int(s) for s in shape)
  if leaf_name == "kernel":  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def ldm_state_dict_shapes(cfg: VAEConfig) -> list[tuple[str, tuple[int, ...]]]:
  """The LDM state-dict keys and torch-layout shapes this config expects (what a .pth would hold)."""
  _, state = nnx.split(build_abstract(cfg))
  flat = _flat(nnx.to_pure_dict(state))
  return sorted((_path_to_ldm(p), _torch_shape(p[-1], v.shape)) for p, v in flat.items())


def params_from_ldm(sd: Mapping[str, np.ndarray], cfg: VAEConfig):
  """Strictly converts an LDM-named torch-layout state dict into (graphdef, params).

  Raises :class:`WeightLoadError` unless the keys match exactly and every shape fits. 1x1 conv
  weights stored as Linear ``(O, I)`` (as some converters do for attention) are accepted.
  """
  graphdef, state = nnx.split(build_abstract(cfg))
  flat = _flat(nnx.to_pure_dict(state))
  missing, mismatched, filled = [], [], {}
  for path, abstract in flat.items():
    key = _path_to_ldm(path)
    want = _torch_shape(path[-1], abstract.shape)
    if key not in sd:
      missing.append(key)
      continue
    w = np.asarray(sd[key])
    if w.shape != want and len(want) == 4 and want[2:] == (1, 1) and w.shape == want[:2]:
      w = w.reshape(want)
    if w.shape != want:
      mismatched.append((key, want, tuple(w.shape)))
      continue
    if path[-1] == "kernel":
      w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    filled[path] = jnp.asarray(w.astype(np.float32))
  expected = {_path_to_ldm(p) for p in flat}
  unexpected = sorted(k for k in sd if k not in expected)
  if missing or unexpected or mismatched:
    raise WeightLoadError(_load_report(missing, unexpected, mismatched, cfg))
  nnx.replace_by_pure_dict(state, _unflat(filled))
  return graphdef, state


def _load_report(missing, unexpected, mismatched, cfg, limit=40):
  def show(items):
    items = list(items)
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return "".join(f"\n    {x}" for x in items[:limit]) + more

  lines = [f"autoencoder weights do not match the architecture {cfg}:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}):{show(sorted(missing))}")
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}):{show(unexpected)}")
  if mismatched:
    lines.append(f"  shape mismatches ({len(mismatched)}) (key, expected, got):"
                 + show(f"{k}: expected {e}, got {g}" for k, e, g in mismatched))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Naming: detection, LDM <-> diffusers key mapping, and sizing the config from the weights.
# ------------------------------------------------------------------------------------------------

_DIFFUSERS_MARKERS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_norm_out.")
_LDM_MARKERS = ("encoder.down.", "decoder.up.", ".mid.block_", ".mid.attn_", "coder.norm_out.")


def detect_naming(keys) -> str:
  """'diffusers' or 'ldm' from the key names; mixed naming is an error."""
  keys = list(keys)
  diff = any(m in k for k in keys for m in _DIFFUSERS_MARKERS)
  ldm = any(m in k for k in keys for m in _LDM_MARKERS)
  if diff and ldm:
    raise WeightLoadError("autoencoder checkpoint mixes LDM (encoder.down.*) and diffusers "
                          "(encoder.down_blocks.*) key names")
  return "diffusers" if diff else "ldm"


# Attention sub-module names: diffusers (new and pre-0.14) -> LDM.
_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
                "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                      "proj_out": "to_out.0"}


def _sub(rest: str, table: Mapping[str, str]) -> str:
  for old, new in table.items():
    if rest.startswith(old + "."):
      return new + rest[len(old):]
  return rest


def diffusers_key_to_ldm(key: str, num_levels: int) -> str:
  """Maps one diffusers AutoencoderKL key to its LDM name (unknown keys are returned unchanged)."""
  m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key)
  if m:
    return f"{m[1]}.norm_out.{m[2]}"
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key)
  if m:
    return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_sub(m[3], {'conv_shortcut': 'nin_shortcut'})}"
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)
  if m:
    return f"{m[1]}.mid.attn_1.{_sub(m[2], _ATTN_TO_LDM)}"
  m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", key)
  if m:
    part, kind, blk, sub, j, rest = m.groups()
    level = int(blk) if kind == "down" else num_levels - 1 - int(blk)
    if sub == "resnets":
      return f"{part}.{kind}.{level}.block.{j}.{_sub(rest, {'conv_shortcut': 'nin_shortcut'})}"
    if sub == "attentions":
      return f"{part}.{kind}.{level}.attn.{j}.{_sub(rest, _ATTN_TO_LDM)}"
    if sub in ("downsamplers", "upsamplers") and j == "0" and rest.startswith("conv."):
      return f"{part}.{kind}.{level}.{sub[:-2]}.{rest}"  # downsamplers.0 -> downsample
  return key


def ldm_key_to_diffusers(key: str, num_levels: int) -> str:
  """Maps one LDM key to the current diffusers name (``to_q``, ``to_out.0``, ``conv_shortcut``)."""
  m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key)
  if m:
    return f"{m[1]}.conv_norm_out.{m[2]}"
  m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key)
  if m:
    return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_sub(m[3], {'nin_shortcut': 'conv_shortcut'})}"
  m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key)
  if m:
    return f"{m[1]}.mid_block.attentions.0.{_sub(m[2], _ATTN_TO_DIFFUSERS)}"
  m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", key)
  if m:
    part, kind, level, sub, rest = m.groups()
    blk = int(level) if kind == "down" else num_levels - 1 - int(level)
    prefix = f"{part}.{kind}_blocks.{blk}"
    if sub == "block":
      j, rest = rest.split(".", 1)
      return f"{prefix}.resnets.{j}.{_sub(rest, {'nin_shortcut': 'conv_shortcut'})}"
    if sub == "attn":
      j, rest = rest.split(".", 1)
      return f"{prefix}.attentions.{j}.{_sub(rest, _ATTN_TO_DIFFUSERS)}"
    return f"{prefix}.{sub}rs.0.{rest}"
  return key


_ATTN_PROJ = re.compile(r".*(\.mid\.attn_1\.|\.attn\.\d+\.)(q|k|v|proj_out)\.weight")


def _num_levels(keys, pattern) -> int:
  levels = {int(m[1]) for k in keys if (m := re.match(pattern, k))}
  return max(levels) + 1 if levels else 0


def diffusers_to_ldm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a diffusers AutoencoderKL state dict to LDM names; Linear attention weights -> 1x1 conv."""
  n = max(_num_levels(sd, r"decoder\.up_blocks\.(\d+)\."), _num_levels(sd, r"encoder\.down_blocks\.(\d+)\."))
  out = {}
  for k, v in sd.items():
    new = diffusers_key_to_ldm(k, n)
    v = np.asarray(v)
    if _ATTN_PROJ.fullmatch(new) and v.ndim == 2:
      v = v.reshape(v.shape + (1, 1))
    if new in out:
      raise WeightLoadError(f"two diffusers keys map to the LDM key {new!r} (one is {k!r})")
    out[new] = v
  return out


def ldm_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an LDM state dict to diffusers names; 1x1-conv attention weights -> Linear (O, I)."""
  n = max(_num_levels(sd, r"decoder\.up\.(\d+)\."), _num_levels(sd, r"encoder\.down\.(\d+)\."))
  out = {}
  for k, v in sd.items():
    v = np.asarray(v)
    if _ATTN_PROJ.fullmatch(k) and v.ndim == 4:
      v = v.reshape(v.shape[:2])
    out[ldm_key_to_diffusers(k, n)] = v
  return out


def config_from_state_dict(sd: Mapping[str, np.ndarray], **overrides) -> VAEConfig:
  """Sizes a :class:`VAEConfig` from LDM-named weights (widths, levels, blocks, z, attention)."""
  w = lambda k: np.shape(sd[k])
  ch, in_channels = w("encoder.conv_in.weight")[:2]
  n_levels = _num_levels(sd, r"encoder\.down\.(\d+)\.")
  ch_mult = []
  for i in range(n_levels):
    cout = w(f"encoder.down.{i}.block.0.conv1.weight")[0]
    if cout % ch:
      raise WeightLoadError(f"encoder.down.{i} width {cout} is not a multiple of ch={ch}")
    ch_mult.append(cout // ch)
  num_res_blocks = _num_levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
  z2 = w("encoder.conv_out.weight")[0]
  resolution = overrides.pop("resolution", VAEConfig.resolution)
  attn = tuple(resolution // 2**i for i in range(n_levels)
               if any(k.startswith(f"encoder.down.{i}.attn.") for k in sd))
  kw = dict(in_channels=int(in_channels), out_ch=int(w("decoder.conv_out.weight")[0]), ch=int(ch),
            ch_mult=tuple(int(m) for m in ch_mult), num_res_blocks=int(num_res_blocks),
            z_channels=int(z2) // 2, embed_dim=int(w("quant_conv.weight")[0]) // 2,
            resolution=resolution, attn_resolutions=attn)
  kw.update(overrides)
  return VAEConfig(**kw)


def _select_vae_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops what is not the autoencoder in common checkpoint layouts.

  * A full LDM/SD checkpoint keeps the VAE under ``first_stage_model.``: only that part is used.
  * CompVis VAE training checkpoints carry ``loss.*`` (LPIPS net, discriminator, logvar): these are
    the training loss, not the autoencoder, and are dropped.
  """
  sd = dict(sd)
  if any(k.startswith("first_stage_model.") for k in sd):
    sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
  return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def source_sha256(source: Any) -> str:
  """sha256 of a weight file's bytes; for a mapping, of its sorted names, shapes, dtypes and data."""
  h = hashlib.sha256()
  if isinstance(source, Mapping):
    for k, v in sorted(weights.load_state_dict(source).items()):
      v = np.ascontiguousarray(v)
      h.update(f"{k}|{v.shape}|{v.dtype}|".encode())
      h.update(v.tobytes())
    return h.hexdigest()
  with open(os.fspath(source), "rb") as f:
    for chunk in iter(functools.partial(f.read, 1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def load_autoencoder(source: Any, config: VAEConfig | None = None, *,
                     precision: str | None = None) -> FrozenAutoencoderKL:
  """Loads the KL autoencoder from a path (.pth/.ckpt/.safetensors/.npz) or a mapping, either naming.

  The architecture is sized from the weights unless ``config`` is given. Raises
  :class:`WeightLoadError` listing missing/unexpected keys and shape mismatches.
  """
  sd = _select_vae_keys(weights.load_state_dict(source))
  naming = detect_naming(sd)
  if naming == "diffusers":
    sd = diffusers_to_ldm(sd)
  if config is None:
    try:
      config = config_from_state_dict(sd, precision=precision)
    except KeyError:  # too broken to size: compare with SD's shape so the report lists what is off
      config = VAEConfig(precision=precision)
  elif precision is not None:
    config = dataclasses.replace(config, precision=precision)
  graphdef, params = params_from_ldm(sd, config)
  return FrozenAutoencoderKL(graphdef, params, config, naming=naming, sha256=source_sha256(source))
