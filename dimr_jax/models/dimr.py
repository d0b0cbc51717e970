"""The DiMR multi-resolution network (Liu et al., NeurIPS 2024) in Flax NNX.

Layout of a model (see ``../shared/docs/dimr_spec.md`` section 2 for the official forward):
  stages, lowest resolution first. Every stage reads the *same* noisy input x_t through its own patch
  conv, adds a learned position embedding and (above the lowest stage) the upsampled features of the
  stage below, runs a U-ViT style stack (first half -> mid -> second half with long skips), and emits
  one noise prediction at its own resolution. The features handed upwards are the concatenation of
  the stage input and every block output (38,400 channels for XL).

Blocks of a stage are *stacked* (created with ``nnx.vmap``) and run with ``jax.lax.scan``: compile
time stays flat in depth (a 57-block G stage compiles as fast as a 3-block one) and rematerialisation
is one ``jax.checkpoint`` around the scan body. The official per-block module names are recovered
by :mod:`dimr_jax.convert` (block i < n//2 -> ``in_blocks[i]``, i == n//2 -> ``mid_block``, else
``out_blocks[i-n//2-1]`` together with ``skip_denses[i-n//2-1]``).

Sizes: :func:`decode_variant` is the size table (``'XL/2R'``, ``'G/2R'``, ``'XL/3R'``, ... ``'mu/2R'``).
XL/2R and G/2R are exactly the released configs; XL/3R is the spec's inferred 512 config; S, M, L and
the G/3R config are ours (scaled width/depth, documented in ``_SIZES``).
"""
from __future__ import annotations

import copy
import json
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dimr_jax.models import feature_stats_kernel, geglu_gemm_mgpu, layers

Array = jax.Array

# ----------------------------------------------------------------------------------------------
# Size table.
# Each size: the Transformer (lowest) branch (dim, heads, num_blocks) and the ConvNeXt branches'
# (dim, num_blocks) from low to high resolution; GLU hidden = 2*dim everywhere, dw kernel 7.
# XL and G are the released configs; XL's third branch is the spec's inferred 512 branch.
# S, M, L (and every size's third branch except XL's) are OUR choices: width and depth scaled
# between U-ViT/DiT-like sizes, keeping head_dim 64 and the ConvNeXt width at half the Transformer's.
# ----------------------------------------------------------------------------------------------
_SIZES = {
    # name: (t_dim, t_heads, t_blocks, [(c_dim, c_blocks) for each ConvNeXt branch, low to high])
    "mu": (32, 2, 1, [(16, 1), (8, 1)]),            # tests only
    "T": (64, 4, 5, [(32, 4), (16, 4)]),             # ours: the embedded digits / MNIST default
    "S": (384, 6, 13, [(192, 12), (96, 12)]),        # ours
    "M": (512, 8, 17, [(256, 16), (128, 16)]),       # ours
    "L": (768, 12, 25, [(384, 20), (192, 20)]),      # ours
    "XL": (960, 16, 39, [(480, 20), (240, 20)]),     # released (2R); 3R inferred in spec 1.2
    "G": (1152, 16, 57, [(576, 29), (288, 29)]),     # released (2R); 3R branch ours
}

VARIANTS = tuple(f"{s}/{r}R" for s in _SIZES for r in (1, 2, 3))


def decode_variant(variant: str, *, image_size: int | None = None, channels: int = 4,
                   num_classes: int = 1001, norm_type: str = "TDRMSN",
                   block_grad_to_lowres: bool = False) -> dict:
  """Returns the model spec in the official layout for e.g. ``'XL/2R'``.

  ``image_size`` is the (latent) input width: 32 for ImageNet 256 (2R), 64 for 512 (3R). The
  lowest stage always runs at image_size / 2^(R-1) ... with patch size 2^(R-1-r) for branch r
  (Transformer 16x16 tokens for both released configs).
  """
  try:
    size, res = variant.split("/")
    num_res = int(res.rstrip("R"))
    if not res.endswith("R") or size not in _SIZES or not 1 <= num_res <= 3:
      raise ValueError
  except ValueError:
    raise ValueError(f"unknown DiMR variant {variant!r}; known: {', '.join(VARIANTS)}") from None
  t_dim, t_heads, t_blocks, conv = _SIZES[size]
  if image_size is None:
    image_size = 16 * 2 ** (num_res - 1)
  stage_specs = []
  dims = [(t_dim, t_blocks)] + conv[: num_res - 1]
  for r, (dim, blocks) in enumerate(dims):
    ratio = 2 ** (num_res - 1 - r)
    if image_size % ratio:
      raise ValueError(f"image_size {image_size} is not divisible by the patch size {ratio} of {variant}")
    side = image_size // ratio
    spec = dict(dim=dim, hidden_dim=2 * dim, num_blocks=blocks, max_height=side, max_width=side,
                image_input_ratio=1, input_feature_ratio=ratio, final_kernel_size=3, dropout_prob=0)
    if r == 0:
      spec.update(block_type="TransformerBlock", num_attention_heads=t_heads)
    else:
      spec.update(block_type="ConvNeXtBlock", kernel_size=7)
    stage_specs.append(spec)
  return dict(channels=channels, num_classes=num_classes, norm_type=norm_type,
              block_grad_to_lowres=block_grad_to_lowres, stage_configs=stage_specs)


_STAGE_KEYS = {"block_type", "dim", "hidden_dim", "num_attention_heads", "kernel_size", "num_blocks",
               "max_height", "max_width", "image_input_ratio", "input_feature_ratio",
               "final_kernel_size", "dropout_prob", "num_classes", "pe_type", "norm_type"}


def _to_dict(c: Any) -> Any:
  if hasattr(c, "to_dict"):
    return c.to_dict()
  if isinstance(c, Mapping):
    return {k: _to_dict(v) for k, v in c.items()}
  if isinstance(c, (list, tuple)):
    return [_to_dict(v) for v in c]
  return c


def model_spec_from_config(config: Any) -> dict:
  """Normalises a model config into the official layout dict.

  Accepts either the official layout (``stage_configs`` present) or our config section with
  ``variant`` (+ optional ``image_size``, ``channels``, ``num_classes``, ``norm_type``,
  ``block_grad_to_lowres``). Unknown stage keys and bad values raise ValueError.
  """
  c = _to_dict(config)
  if not isinstance(c, Mapping):
    raise TypeError(f"model config must be a mapping, got {type(config).__name__}")
  if c.get("stage_configs"):
    spec = copy.deepcopy(dict(c))
  elif c.get("variant"):
    spec = decode_variant(
        c["variant"], image_size=c.get("image_size"), channels=c.get("channels", 4),
        num_classes=c.get("num_classes", 1001), norm_type=c.get("norm_type", "TDRMSN"),
        block_grad_to_lowres=c.get("block_grad_to_lowres", False))
  else:
    raise ValueError("model config needs either 'variant' (e.g. 'XL/2R') or 'stage_configs'")
  spec.setdefault("channels", 4)
  spec.setdefault("num_classes", 1001)
  spec.setdefault("norm_type", "TDRMSN")
  spec.setdefault("block_grad_to_lowres", False)
  if spec["norm_type"] not in layers.NORM_TYPES:
    layers.make_norm(spec["norm_type"], 1)  # raises the clear error
  for i, s in enumerate(spec["stage_configs"]):
    unknown = set(s) - _STAGE_KEYS
    if unknown:
      raise ValueError(f"stage_configs[{i}] has unknown keys {sorted(unknown)}")
    if s["block_type"] not in ("TransformerBlock", "ConvNeXtBlock"):
      raise ValueError(f"stage_configs[{i}].block_type {s['block_type']!r} must be "
                       "'TransformerBlock' or 'ConvNeXtBlock'")
    if s.get("pe_type", "APE") != "APE":
      raise ValueError(f"stage_configs[{i}].pe_type {s['pe_type']!r}: only 'APE' (learned absolute) "
                       "is supported; no released DiMR config uses Axial_RoPE")
    if s.get("dropout_prob", 0):
      raise ValueError(f"stage_configs[{i}].dropout_prob must be 0 (all released configs use 0)")
  return spec


def num_built_blocks(num_blocks: int) -> int:
  """The official stage builds num_blocks//2*2+1 blocks (an even count gets one extra)."""
  return num_blocks // 2 * 2 + 1


REMAT_POLICIES = ("none", "block", "dots")


def _remat_policy(name: str):
  if name == "none":
    return None
  if name == "block":
    return jax.checkpoint_policies.nothing_saveable
  if name == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"unknown remat policy {name!r}; choose one of {REMAT_POLICIES}")


def _make_block(s: dict, norm_type: str, dtype, attention_impl, pallas_ops: tuple[str, ...],
                rngs: nnx.Rngs) -> nnx.Module:
  if s["block_type"] == "TransformerBlock":
    return layers.TransformerBlock(s["dim"], s["hidden_dim"], s["num_attention_heads"], norm_type,
                                   dtype=dtype, rngs=rngs, attention_impl=attention_impl,
                                   pallas_ops=pallas_ops)
  return layers.ConvNeXtBlock(s["dim"], s["hidden_dim"], s.get("kernel_size", 7), norm_type,
                              dtype=dtype, rngs=rngs, pallas_ops=pallas_ops)


def _stacked_blocks(n: int, make, rngs: nnx.Rngs):
  """Creates n identical blocks with stacked parameters (leading axis n) and independent inits."""
  if n == 0:
    return None
  keys = jax.random.split(rngs.params(), n)

  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return make(nnx.Rngs(params=key))

  return create(keys)


def _unstack(tree, n: int) -> list:
  """Stacked state (leading axis n) -> n per-block states, via split (its transpose: concat)."""
  if n == 0:
    return []
  leaves, treedef = jax.tree.flatten(tree)
  parts = [jnp.split(leaf, n, axis=0) for leaf in leaves]
  return [jax.tree.unflatten(treedef, [p[i].reshape(p[i].shape[1:]) for p in parts])
          for i in range(n)]


class PixelShuffleUpsample(nnx.Module):
  """TD-LN(C_low) -> Linear(C_low -> r*r*dim) -> pixel shuffle x r -> TD-LN(dim).

  Official names: ``upsample.0`` (norm in), ``upsample.1.kernel`` (Linear), ``upsample.2`` (norm out).
  """

  def __init__(self, c_low: int, dim: int, ratio: int, *, dtype, rngs: nnx.Rngs):
    self.norm_in = layers.TDLayerNorm(c_low)
    self.linear = layers.Dense(c_low, dim * ratio * ratio, dtype=dtype, rngs=rngs)
    self.norm_out = layers.TDLayerNorm(dim)
    self.ratio = ratio

  @jax.named_scope("upsample")
  def __call__(self, feats, tau: Array, side: tuple[int, int]) -> Array:
    """feats: (B, N, C_low) lower-stage features; rows [0, h*w) are its (h, w) = ``side`` grid.
    Or ``(features, (mean, inv))`` with their per-token statistics already computed (the lower
    stage's ``feature_stats`` kernel, sampling only); they serve the folded norm.

    Rows past h*w (the Transformer's class token and padding) ride along through the per-token
    norm and Linear and are dropped before the shuffle.
    """
    feats, stats = feats if isinstance(feats, tuple) else (feats, None)
    b = feats.shape[0]
    hh, ww = side
    gamma = layers.shared_value(self.norm_in.weight(tau))
    if gamma is not None:
      h = self._folded_norm_linear(feats, gamma, layers.shared_value(self.norm_in.bias(tau)),
                                   stats)
    else:
      h = self.linear(self.norm_in(feats, tau))
    h = h[:, :hh * ww].reshape(b, hh, ww, -1)
    return self.norm_out(layers.pixel_shuffle(h, self.ratio), tau)

  def _folded_norm_linear(self, x: Array, gamma: Array, beta: Array, stats=None) -> Array:
    """``linear(norm_in(x))`` for a batch-shared gamma/beta, without writing the normalised x.

    ((x - m) * inv * g + b) @ W + c == inv * (x @ (g W) - m * 1^T(g W)) + (b @ W + c): the C_low-wide
    input (38,400 channels for XL) is read once for its statistics and once by the GEMM.
    """
    dt = self.linear.dtype
    w = self.linear.kernel[...]
    # 1^T(g W) from the same (rounded) weights the GEMM uses, so the mean term cancels exactly.
    wg = (gamma[:, None] * w).astype(dt)
    mean, inv = layers.layer_norm_stats(x) if stats is None else stats
    z = jnp.matmul(x.astype(dt), wg, preferred_element_type=jnp.float32)
    shift = beta @ w + self.linear.bias[...]
    return (inv * (z - mean * jnp.sum(wg.astype(jnp.float32), axis=0)) + shift).astype(dt)


class Stage(nnx.Module):
  """One resolution branch (official ``Stage``)."""

  def __init__(self, s: dict, *, channels: int, num_classes: int, norm_type: str, lowres_dim: int | None,
               lowres_side: int | None, dtype, remat: str, attention_impl: str | None,
               scan_unroll: int | bool | None = None, pallas_ops: tuple[str, ...] = (),
               rngs: nnx.Rngs):
    dim = s["dim"]
    self.is_transformer = s["block_type"] == "TransformerBlock"
    self.image_input_ratio = s.get("image_input_ratio", 1)
    self.max_height, self.max_width = s["max_height"], s["max_width"]
    self.dtype = dtype
    self.remat = remat
    self.scan_unroll = scan_unroll
    self.feature_stats = "feature_stats" in pallas_ops
    # cuDNN attention wants the token count padded (see layers.attention); XLA needs no padding.
    self.token_multiple = (layers.ATTENTION_TOKEN_MULTIPLE
                           if self.is_transformer
                           and layers.resolve_attention_impl(attention_impl, dtype) == "cudnn" else 1)
    ratio = s["input_feature_ratio"]
    self.patch = layers.Conv(channels, dim, ratio, stride=ratio, dtype=dtype, rngs=rngs)
    self.pos_emb = nnx.Param(layers.linear_init(rngs.params(), (self.max_height * self.max_width, dim)))
    self.class_emb = (nnx.Param(layers.linear_init(rngs.params(), (num_classes, dim)))
                      if self.is_transformer else None)
    if lowres_dim is not None:
      up_ratio = self.max_height // lowres_side
      self.upsample = PixelShuffleUpsample(lowres_dim, dim, up_ratio, dtype=dtype, rngs=rngs)
    else:
      self.upsample = None
    n = num_built_blocks(s["num_blocks"])
    half = n // 2
    self.num_blocks = n
    make = lambda r: _make_block(s, norm_type, dtype, attention_impl, pallas_ops, r)  # noqa: E731
    self.in_blocks = _stacked_blocks(half, make, rngs)
    self.mid_block = make(rngs)
    self.out_blocks = _stacked_blocks(half, make, rngs)
    self.skip_denses = _stacked_blocks(
        half, lambda r: layers.Dense(2 * dim, dim, dtype=dtype, rngs=r), rngs)
    self.out_norm = layers.TDLayerNorm(dim)
    k = s.get("final_kernel_size", 3)
    self.out_conv = layers.Conv(dim, channels, k, padding=((k // 2, k // 2),) * 2, dtype=dtype, rngs=rngs)

  @property
  def feature_dim(self) -> int:
    """Width of the features handed to the next stage: dim * (blocks + 1)."""
    return self.pos_emb.shape[-1] * (self.num_blocks + 1)

  def _unroll(self):
    # Unrolling is the fast default where measured: on an H100 the XL Transformer stage's
    # fwd+bwd took 176 ms as a rolled scan and 128 ms unrolled (batch 64; the rolled backward
    # copies stacked gradients every iteration), and XLA:CPU runs a depthwise-conv gradient
    # inside a loop ~15x slower. TPUs keep the compact rolled loop (short compiles on pods).
    # ``model.scan_unroll=1`` forces the rolled loop anywhere.
    unroll = self.scan_unroll
    if unroll is None:
      unroll = 1 if jax.default_backend() == "tpu" else True
    return unroll

  def _remat(self, body):
    if self.remat == "none":
      return body
    # Only used inside lax.scan, where CSE cannot merge the recomputation back into the forward.
    return jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=False)

  def __call__(self, x: Array, y: Array, tau: Array, lowres_feats):
    """Returns (eps prediction, features for the next stage).

    The features are the stage input and every block output concatenated along channels (the
    official ``torch.cat(ext, -1)``), as tokens: (B, N, (n+1)*d) with the H*W image tokens in
    rows [0, H*W) (a Transformer stage's class token and padding follow them).
    """
    h = layers.area_downsample(x, self.image_input_ratio)
    h = self.patch(h)
    b, hh, ww, d = h.shape
    pos = self.pos_emb[...].reshape(self.max_height, self.max_width, d)[:hh, :ww]
    h = h + pos.astype(h.dtype)
    if self.upsample is not None:
      if lowres_feats is None:
        raise ValueError("a stage with an upsampler needs the lower stage's features")
      r = self.upsample.ratio
      h = h + self.upsample(lowres_feats, tau, (hh // r, ww // r)).astype(h.dtype)
    seq_len = None
    if self.is_transformer:
      cls = jnp.take(self.class_emb[...], y, axis=0).astype(h.dtype)
      # The class token goes *last* (the official puts it first; attention and the per-token
      # layers do not see the order, so the result is the same): image tokens are then rows
      # [0, h*w) of every block output, as the upsampler of the next stage wants them.
      h = jnp.concatenate([h.reshape(b, hh * ww, d), cls[:, None]], axis=1)
      seq_len = hh * ww + 1
      if self.token_multiple > 1 and tau.shape[0] > 1:
        # Padded once for the whole stack (cuDNN's attention backward rejects 257 tokens, 264
        # run at the same speed); padded tokens are masked out as keys and dropped at the end,
        # so they never touch real ones. With one time for the whole batch (the samplers) the
        # tokens stay unpadded: nothing is differentiated there, cuDNN's forward takes 257 and
        # every per-token GEMM and pass does 2.7% less work (layers.attention pads only if such
        # a call is differentiated after all).
        h = jnp.pad(h, [(0, 0), (0, -seq_len % self.token_multiple), (0, 0)])

    tokens = self.flat_rows(h, tau) if self.is_transformer else None
    if tokens is not None:  # (B, N, d) -> (R, d): the B*N real rows padded to a multiple of 8
      real = math.prod(tokens)
      h = jnp.pad(h.reshape(real, d), [(0, -real % geglu_gemm_mgpu.ROW_MULTIPLE), (0, 0)])

    def block(blk, carry):
      if not self.is_transformer:
        return blk(carry, tau)
      return blk(carry, tau, seq_len=seq_len, tokens=tokens)

    def in_body(carry, p):
      out = block(nnx.merge(gdef_i, p), carry)
      return out, out

    def out_body(carry, xs):
      pb, ps, skip = xs
      with jax.named_scope("skip"):
        hcat = nnx.merge(gdef_s, ps).on_concatenation([carry, skip])
      out = block(nnx.merge(gdef_o, pb), hcat)
      return out, out

    half = self.num_blocks // 2
    gdef_i, st_i = nnx.split(self.in_blocks) if half else (None, None)
    gdef_o, st_o = nnx.split(self.out_blocks) if half else (None, None)
    gdef_s, st_s = nnx.split(self.skip_denses) if half else (None, None)
    unroll = self._unroll()
    if unroll is True and self.remat == "none":
      # A Python loop: every block output stays a separate array until the one concatenation
      # that makes the features (the official torch.cat(ext, -1)); no (blocks, ...) stack is
      # moved to the last axis. (With remat the loop would need prevent_cse=True, which blocked
      # fusion: XL b128 remat=dots ran at 170 img/s; remat runs use the scan below.)
      outs = [h]
      # Per-block parameters by one split of each stacked leaf: its gradient is one concatenate
      # (indexing a[i] would transpose to a zero-padded full-stack add per block).
      p_in, p_out = _unstack(st_i, half), _unstack((st_o, st_s), half)
      for i in range(half):
        h, _ = in_body(h, p_in[i])
        outs.append(h)
      h = block(self.mid_block, h)
      outs.append(h)
      for i in range(half):
        h, _ = out_body(h, p_out[i] + (outs[half - i],))  # skip from in-block half-1-i
        outs.append(h)
      with jax.named_scope("features"):
        feats = self._feature_list(outs, b, real if tokens is not None else None, tau)
    else:
      ext = [h[None]]
      skips = None
      if half:
        h, skips = jax.lax.scan(self._remat(in_body), h, st_i, unroll=unroll)
        ext.append(skips)
      h = block(self.mid_block, h)
      ext.append(h[None])
      if half:
        h, outs = jax.lax.scan(self._remat(out_body), h, (st_o, st_s, skips[::-1]),
                               unroll=unroll)
        ext.append(outs)
      if tokens is not None:
        ext = [e[:, :real] for e in ext]
      with jax.named_scope("features"):
        feats = self._features(ext, b, d)
    with jax.named_scope("head"):
      if tokens is not None:
        h = h[:real].reshape(*tokens, d)
      if self.is_transformer:
        h = h[:, :hh * ww].reshape(b, hh, ww, d)
      out = self.out_conv(self.out_norm(h, tau))
    return out, feats

  def flat_rows(self, h: Array, tau: Array) -> tuple[int, int] | None:
    """(B, N) where a Transformer stage runs on its tokens as flat padded rows, else None.

    That is where the MLPs use the Mosaic GEMM + GEGLU kernel (a batch-shared time on a Hopper
    GPU, i.e. the samplers) and B*N is not a multiple of the rows its TMA descriptors need
    (250 x 257 = 64250): the B*N rows are padded once for the whole stack instead of once per
    MLP, and attention takes a slice of them (layers.TransformerBlock)."""
    b, n = h.shape[0], h.shape[1]
    if (b * n) % geglu_gemm_mgpu.ROW_MULTIPLE == 0 or not self.mid_block.block2.uses_mgpu(tau):
      return None
    return (b, n)

  def _feature_list(self, outs: list[Array], b: int, real: int | None, tau: Array):
    """The stage input and block outputs concatenated, (B, N, L*d); ``real`` (flat padded rows,
    see flat_rows): only the first ``real`` rows of each output count.

    With one time for the whole batch and ``pallas_ops`` 'feature_stats', one kernel writes the
    concatenation and each token's mean and 1/std over it, which the next stage's folded
    upsampler norm needs (feature_stats_kernel: XLA's concatenate + reduce fusion runs at a third
    of memory speed); returned as ``(features, (mean, inv))``.
    """
    d = outs[0].shape[-1]
    if self.feature_stats and tau.shape[0] == 1 and layers.kernel_mesh() is None:
      rows = real if real is not None else b * math.prod(outs[0].shape[1:-1])
      cat, mean, inv = feature_stats_kernel.feature_stats([o.reshape(-1, d) for o in outs], rows)
      n = rows // b
      return cat.reshape(b, n, -1), (mean.reshape(b, n, 1), inv.reshape(b, n, 1))
    if real is not None:  # the real rows of each output (slices: operands of the concatenate)
      outs = [o[:real] for o in outs]
    return jnp.concatenate(outs, axis=-1).reshape(b, -1, len(outs) * d)

  def _features(self, ext, b, d):
    """Stage input + every block output, (B, N, (n+1)*d) with channel index l*d + c."""
    ext = jnp.concatenate(ext, axis=0)
    ext = ext.reshape(ext.shape[0], b, -1, d)
    # (L, B, N, d) -> (B, N, L*d): channel index = l*d + c, as torch.cat(ext, -1).
    return jnp.moveaxis(ext, 0, -2).reshape(b, -1, ext.shape[0] * d)


class DiMR(nnx.Module):
  """Multi-resolution diffusion network; ``__call__(x, time_in, y)`` -> list of eps, low-res first.

  Args:
    spec: model spec in the official layout (see :func:`model_spec_from_config`).
    dtype: compute dtype (params stay float32).
    remat: 'none' | 'block' (recompute every block in backward) | 'dots' (save matmul outputs).
    attention_impl: passed to ``jax.nn.dot_product_attention`` (None: let JAX choose; 'cudnn').
    scan_unroll: ``unroll`` of the per-stage block scans; None = fully unrolled on CPU/GPU (fastest
      steps), a rolled loop on TPU (short compiles on pods).
    pallas_ops: which ops run as Pallas kernels ('auto': those measured faster inside the model,
      ``layers.auto_pallas_ops()``: the GEGLU pass and (sampling) the features' statistics on GPU
      in 16-bit, and on a Hopper GPU the Mosaic GPU GEMM + GEGLU for sampling and the
      shared-memory depthwise conv; '': none; or a comma list, see ``layers.resolve_pallas_ops``).
  """

  def __init__(self, spec: Mapping[str, Any], *, dtype: Any = jnp.float32, remat: str = "none",
               attention_impl: str | None = None, scan_unroll: int | bool | None = None,
               pallas_ops: str | None = "auto", rngs: nnx.Rngs):
    spec = model_spec_from_config(spec)
    ops = layers.resolve_pallas_ops(pallas_ops, dtype)
    _remat_policy(remat)  # validate early
    # Stored as a JSON string: graph definitions must hash (jit static args), dicts do not.
    self.spec_json = json.dumps(spec, sort_keys=True)
    self.block_grad_to_lowres = bool(spec["block_grad_to_lowres"])
    self.num_classes = spec["num_classes"]
    self.channels = spec["channels"]
    stages = []
    lowres_dim = lowres_side = None
    for s in spec["stage_configs"]:
      st = Stage(s, channels=spec["channels"], num_classes=spec["num_classes"],
                 norm_type=spec["norm_type"], lowres_dim=lowres_dim, lowres_side=lowres_side,
                 dtype=dtype, remat=remat, attention_impl=attention_impl,
                 scan_unroll=scan_unroll, pallas_ops=ops, rngs=rngs)
      stages.append(st)
      lowres_dim = s["dim"] * (num_built_blocks(s["num_blocks"]) + 1)
      lowres_side = s["max_height"]
    self.stages = nnx.List(stages) if hasattr(nnx, "List") else stages

  @property
  def spec(self) -> dict:
    """The model spec in the official layout (see :func:`model_spec_from_config`)."""
    return json.loads(self.spec_json)

  def __call__(self, x: Array, time_in: Array, y: Array) -> list[Array]:
    """x: (B,H,W,C) noisy input; time_in: (B,) or scalar, = n/1000*8-4; y: (B,) int labels."""
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise ValueError(f"expected NHWC input with {self.channels} channels, got shape {x.shape}")
    tau = layers.time_gate_input(time_in)
    y = jnp.asarray(y, jnp.int32)
    feats, outs = None, []
    for r, stage in enumerate(self.stages):
      with jax.named_scope(f"stage{r}"):
        out, feats = stage(x, y, tau, feats)
      if self.block_grad_to_lowres:
        feats = jax.lax.stop_gradient(feats)
      outs.append(out.astype(jnp.float32))
    return outs


def create_model(config: Any, *, seed: int = 0, dtype: Any = jnp.float32, remat: str = "none",
                 attention_impl: str | None = None, pallas_ops: str | None = "auto") -> DiMR:
  """Builds a DiMR from a config section (``variant`` or official ``stage_configs`` layout)."""
  return DiMR(model_spec_from_config(config), dtype=dtype, remat=remat,
              attention_impl=attention_impl, pallas_ops=pallas_ops, rngs=nnx.Rngs(params=seed))


def abstract_model(config: Any, **kw) -> DiMR:
  """Shape-only model (no memory): ``nnx.eval_shape`` of :func:`create_model`."""
  return nnx.eval_shape(lambda: create_model(config, **kw))


def count_params(model: nnx.Module) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
