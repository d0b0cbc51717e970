"""Building blocks of DiMR in Flax NNX: time-dependent parameters, norms, GEGLU MLP, attention, blocks.

Everything is NHWC / (B, N, C) channels-last. Parameters are float32; ``dtype`` is the compute dtype
(bf16 on accelerators). Norm statistics are always computed in float32 and cast back, which costs
nothing measurable and keeps the bf16 path within ~1e-2 of float32.

Time enters DiMR *only* through :class:`TimeDependentParameter` (TDP): every TD norm holds two end
points ``param0``/``param1`` and a per-element sigmoid gate. The gate's weight/bias are named
``nodecay_weight``/``nodecay_bias`` exactly as in the official code, because weight decay masks and
the checkpoint converter key on those names.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dimr_jax.models import (dense_residual_mgpu, dwconv_kernel, dwconv_mgpu, geglu_gemm_kernel,
                             geglu_gemm_mgpu, geglu_kernel, pallas_util, rmsnorm_kernel)

Array = jax.Array

# PyTorch's default Linear/Conv init and the official trunc_normal(0.02) with absolute bounds +-2
# (effectively an untruncated normal at std 0.02).
linear_init = nnx.initializers.normal(0.02)
conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int):
  """PyTorch Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def time_gate_input(time_in: Array) -> Array:
  """The official TDP time variable: tau = time_in / 4 with time_in = n/1000*8-4, shape (B, 1)."""
  t = jnp.asarray(time_in, jnp.float32)
  t = jnp.reshape(t, (-1, 1))
  return t / 4.0


class TimeDependentParameter(nnx.Module):
  """``value(tau) = param1 + sigmoid(tau*(1+nodecay_weight) + nodecay_bias) * (param0 - param1)``.

  The official init sets param0 == param1 == ``init_value`` and the gate to zero, so a fresh model
  does not depend on time at all; training moves the end points apart.
  """

  def __init__(self, dim: int, init_value: float):
    self.param0 = nnx.Param(jnp.full((dim,), init_value, jnp.float32))
    self.param1 = nnx.Param(jnp.full((dim,), init_value, jnp.float32))
    self.nodecay_weight = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.nodecay_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, tau: Array) -> Array:
    """tau: (B, 1) -> value (B, dim), float32."""
    gate = jax.nn.sigmoid(tau * (1.0 + self.nodecay_weight[...]) + self.nodecay_bias[...])
    p0, p1 = self.param0[...], self.param1[...]
    return p1 + gate * (p0 - p1)


def _bcast(v: Array, x: Array) -> Array:
  """(B, C) -> (B, 1, ..., 1, C) to broadcast against x of rank >= 2."""
  return v.reshape(v.shape[:1] + (1,) * (x.ndim - 2) + v.shape[1:])


def _layer_normalize(x: Array, eps: float = 1e-5) -> Array:
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return (xf - mean) * jax.lax.rsqrt(var + eps)


# The norms are rematerialised: their float32 intermediates are cheap to recompute but would
# otherwise be saved for the backward pass (several full-size f32 copies per block in bf16 training).
# The RMS norm's XLA expression lives beside its Pallas kernels (rmsnorm_kernel.py).
_scaled_rms_norm = rmsnorm_kernel.scaled_rms_norm_xla


@jax.named_scope("norm")
@jax.checkpoint
def _affine_layer_norm(x: Array, weight: Array, bias: Array) -> Array:
  return (_layer_normalize(x) * weight + bias).astype(x.dtype)


@jax.named_scope("norm")
def layer_norm_stats(x: Array, eps: float = 1e-5) -> tuple[Array, Array]:
  """(mean, 1/sqrt(var + eps)) over the last axis in float32 from one read of x (E[x^2] - mean^2)."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + eps)


def shared_value(v: Array) -> Array | None:
  """A time-dependent norm parameter as one (C,) vector when every image shares it, else None.

  TDP values are (B, C), or (1, C) when the model is called with one scalar time for the whole
  batch (the samplers do: every image sits at the same t). A shared gamma/beta can be folded into
  the weights of the Linear after the norm.
  """
  return v[0] if v.shape[0] == 1 else None


class Norm(nnx.Module):
  """The norms' interface: ``norm(x, tau)``, and :meth:`tap` for a pre-norm residual block."""

  def tap(self, x: Array, tau: Array) -> tuple[Array, Array]:
    """``(x, self(x, tau))`` for ``x + f(norm(x))`` (see Attention.residual): a norm may route
    the residual stream's gradient through its own backward (TDRMSNorm's 'pallas_bwd')."""
    return x, self(x, tau)


class TDRMSNorm(Norm):
  """Time-dependent RMSNorm (the released ``norm_type='TDRMSN'``): scale(t) only, no shift.

  ``impl`` (rmsnorm_kernel.py): "xla"; "pallas" (pallas_ops 'rmsnorm': kernels both ways; it
  wins over 'rmsnorm_bwd'); "pallas_bwd" (pallas_ops 'rmsnorm_bwd': XLA's forward, still fused
  with the residual add, and the Pallas backward, which through :meth:`tap` also adds the residual
  stream's gradient).
  """

  def __init__(self, dim: int, pallas_ops: tuple[str, ...] = ()):
    self.scale = TimeDependentParameter(dim, 1.0)
    self.impl = ("pallas" if "rmsnorm" in pallas_ops else
                 "pallas_bwd" if "rmsnorm_bwd" in pallas_ops else "xla")

  def __call__(self, x: Array, tau: Array) -> Array:
    if self.impl == "xla" or kernel_mesh() is not None:  # see kernel_mesh: XLA partitions these
      return _scaled_rms_norm(x, _bcast(self.scale(tau), x))
    return rmsnorm_kernel.scaled_rms_norm(x, self.scale(tau), impl=self.impl)

  def tap(self, x: Array, tau: Array) -> tuple[Array, Array]:
    if self.impl == "pallas_bwd" and kernel_mesh() is None:
      return rmsnorm_kernel.scaled_rms_norm_tap(x, self.scale(tau))
    return super().tap(x, tau)


class TDLayerNorm(Norm):
  """Time-dependent LayerNorm (the paper's TD-LN, official ``LayerNorm`` in sigmoid/module.py).

  gamma(t) and beta(t) are TDPs named ``weight``/``bias`` as in the official state dict.
  """

  def __init__(self, dim: int):
    self.weight = TimeDependentParameter(dim, 1.0)
    self.bias = TimeDependentParameter(dim, 0.0)

  def __call__(self, x: Array, tau: Array) -> Array:
    return _affine_layer_norm(x, _bcast(self.weight(tau), x), _bcast(self.bias(tau), x))


class RMSNorm(Norm):
  """Plain RMSNorm with a learned scale (``norm_type='RMSN'`` ablation: no time input)."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: Array, tau: Array) -> Array:
    del tau
    return _scaled_rms_norm(x, self.scale[...])


class LayerNorm(Norm):
  """Plain LayerNorm with learned gamma/beta (``norm_type='PLAIN_LN'`` ablation: no time input)."""

  def __init__(self, dim: int):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: Array, tau: Array) -> Array:
    del tau
    return _affine_layer_norm(x, self.weight[...], self.bias[...])


NORM_TYPES = {"TDRMSN": TDRMSNorm, "LN": TDLayerNorm, "RMSN": RMSNorm, "PLAIN_LN": LayerNorm}


def make_norm(norm_type: str, dim: int, pallas_ops: tuple[str, ...] = ()) -> Norm:
  if norm_type not in NORM_TYPES:
    raise ValueError(
        f"unknown norm_type {norm_type!r}; choose one of {sorted(NORM_TYPES)} "
        "('TDRMSN' is the released DiMR choice, 'LN' the paper's TD-LayerNorm)")
  if norm_type == "TDRMSN":
    return TDRMSNorm(dim, pallas_ops)
  return NORM_TYPES[norm_type](dim)


def kernel_mesh() -> Any:
  """The multi-device mesh set with ``jax.set_mesh`` while tracing (the train loop sets it), or None.

  XLA does not partition Pallas kernels (they are custom calls to it): inside a sharded jit it
  would gather their operands and run each kernel on the whole global batch on every device. So
  under such a mesh the model runs its kernels per device (``shard_map`` over the batch axis) or
  falls back to XLA's own ops, which XLA partitions.
  """
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get is not None else None
  if mesh is None or mesh.empty or mesh.size <= 1:
    return None
  return mesh


def _per_device(fn, x: Array, *replicated: Array, mesh: Any) -> Array | None:
  """``fn(x, *replicated)`` run per device with x's batch (leading) axis split over every axis of
  ``mesh`` (as the train loop and ``evaluate`` shard the batch); None if it does not divide."""
  if x.shape[0] % mesh.size:
    return None
  batch = P(tuple(mesh.axis_names))
  return jax.shard_map(fn, mesh=mesh, in_specs=(batch,) + (P(),) * len(replicated),
                       out_specs=batch, check_vma=False)(x, *replicated)


def _acc(dtype) -> Any:
  """Result type of matmuls/convs: float32 for the exact float32 path, else the compute dtype."""
  return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype)


class Dense(nnx.Module):
  """Linear layer with the official init (normal(0.02) weight, zero bias), kernel (in, out)."""

  def __init__(self, din: int, dout: int, *, use_bias: bool = True, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(linear_init(rngs.params(), (din, dout), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    # bf16 in, bf16 out (the MXU / tensor cores accumulate in f32 internally); f32 stays exact.
    y = jnp.matmul(x, self.kernel[...].astype(self.dtype), preferred_element_type=_acc(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y.astype(self.dtype)

  def on_concatenation(self, xs: list[Array]) -> Array:
    """``self(concatenate(xs, -1))`` without writing the concatenation: one GEMM per part.

    The parts' products are summed (XLA can take the running sum as the next GEMM's addend), so
    the concatenated input is never materialised (the U-ViT skip Linear: 2d inputs, d outputs).
    """
    kernel = self.kernel[...].astype(self.dtype)
    y, start = None, 0
    for x in xs:
      width = x.shape[-1]
      part = jnp.matmul(x.astype(self.dtype), kernel[start:start + width],
                        preferred_element_type=_acc(self.dtype))
      y = part if y is None else y + part
      start += width
    if start != kernel.shape[0]:
      raise ValueError(f"parts of width {start} for a Linear of input width {kernel.shape[0]}")
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y.astype(self.dtype)


class Conv(nnx.Module):
  """2-D conv (NHWC) with PyTorch's default init; kernel (kh, kw, in/groups, out)."""

  def __init__(self, din: int, dout: int, kernel_size: int, *, stride: int = 1, padding: Any = "VALID",
               groups: int = 1, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    fan_in = din // groups * kernel_size * kernel_size
    self.kernel = nnx.Param(conv_kernel_init(
        rngs.params(), (kernel_size, kernel_size, din // groups, dout), jnp.float32))
    self.bias = nnx.Param(torch_conv_bias_init(fan_in)(rngs.params(), (dout,), jnp.float32))
    self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

  def __call__(self, x: Array) -> Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
        preferred_element_type=_acc(self.dtype))
    return (y + self.bias[...].astype(y.dtype)).astype(self.dtype)


class PreNormSubBlock(nnx.Module):
  """A pre-norm sub-block ``f(norm(x))`` (Attention, GegluMLP): ``self.norm``, ``_body(xn, **kw)``
  and the named scope ``_scope``; :meth:`residual` is the block's ``x + f(norm(x))``."""
  _scope: str = ""

  def __call__(self, x: Array, tau: Array, **kw) -> Array:
    """``f(norm(x))`` (the sub-block alone, without the residual add)."""
    with jax.named_scope(self._scope):
      return self._body(self.norm(x, tau), **kw)

  def residual(self, x: Array, tau: Array, **kw) -> Array:
    """``x + self(x, tau, **kw)``, the norm tapping x (:meth:`Norm.tap`) so that its backward can
    take the residual stream's gradient. The add is the block's (outside the sub-block's scope)."""
    with jax.named_scope(self._scope):
      x, xn = self.norm.tap(x, tau)
      out = self._body(xn, **kw)
    return x + out


class GegluMLP(PreNormSubBlock):
  """Pre-norm GEGLU: ``w2(gelu_exact(w0(n(x))) * w1(n(x)))``, one norm shared by w0 and w1."""
  _scope = "mlp"

  def __init__(self, dim: int, hidden: int, norm_type: str, *, dtype: Any, rngs: nnx.Rngs,
               pallas_ops: tuple[str, ...] = (), fuse_residual: bool = False):
    self.norm = make_norm(norm_type, dim, pallas_ops)
    # w2 + bias + the block's residual add as one Mosaic GPU GEMM (dense_residual_mgpu.py), asked
    # for by the ConvNeXt blocks, whose add no neighbour fuses (NOTES row 45)
    self.fuse_residual = (fuse_residual and "dense_residual_mgpu" in pallas_ops
                          and dense_residual_mgpu.available())
    self.w0 = Dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.w1 = Dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.w2 = Dense(hidden, dim, dtype=dtype, rngs=rngs)
    self.geglu_impl = "pallas" if "geglu" in pallas_ops else "xla"
    self.fused_gemm = "geglu_gemm" in pallas_ops or (
        "geglu_gemm_narrow" in pallas_ops and dim < GEGLU_GEMM_NARROW_BELOW)
    self.mgpu_gemm = ("geglu_gemm_mgpu" in pallas_ops and geglu_gemm_mgpu.available()
                      and geglu_gemm_mgpu.default_config(dim, hidden) is not None)

  def uses_mgpu(self, tau: Array) -> bool:
    """The Mosaic GPU kernel where it is enabled and the whole batch shares one time (the
    samplers; forward-only use, see geglu_gemm_mgpu)."""
    return (self.mgpu_gemm and tau.shape[0] == 1 and jnp.dtype(self.w0.dtype) == jnp.bfloat16
            and kernel_mesh() is None)  # multi-device: the per-device GEGLU kernel path below

  def __call__(self, x: Array, tau: Array, **kw) -> Array:
    if self.uses_mgpu(tau):
      with jax.named_scope(self._scope):
        return self._mgpu_body(x, tau)
    return super().__call__(x, tau, **kw)

  def residual(self, x: Array, tau: Array, **kw) -> Array:
    if self.uses_mgpu(tau):
      with jax.named_scope(self._scope):
        g, rows = self._mgpu_hidden(x, tau)
        if self._fuses_residual(x, g.shape[0]):
          return self._w2_residual(g, x)
        out = self._w2_rows(g, rows, x.shape[:-1])
      return x + out
    if self._fuses_residual(x, math.prod(x.shape[:-1])):
      with jax.named_scope(self._scope):
        x, xn = self.norm.tap(x, tau)
        return self._w2_residual(self._hidden(xn), x)
    return super().residual(x, tau, **kw)

  def _fuses_residual(self, x: Array, rows: int) -> bool:
    """Whether ``x + w2(g)`` runs as one kernel: asked for, bf16, one device, a shape it takes
    (rows that are exactly x's: no padded rows to slice off after w2)."""
    return (self.fuse_residual and x.dtype == jnp.bfloat16
            and jnp.dtype(self.w2.dtype) == jnp.bfloat16 and kernel_mesh() is None
            and rows == math.prod(x.shape[:-1])
            and dense_residual_mgpu.applies(*self.w2.kernel.shape, rows))

  def _w2_residual(self, g: Array, x: Array) -> Array:
    """``x + w2(g)`` with the bias and the add in the GEMM's epilogue."""
    w2 = self.w2
    out = dense_residual_mgpu.dense_residual(
        g.reshape(-1, g.shape[-1]).astype(w2.dtype), w2.kernel[...].astype(w2.dtype),
        w2.bias[...], x.reshape(-1, x.shape[-1]))
    return out.reshape(x.shape)

  def _weights01(self) -> tuple[Array, Array]:
    # w0 and w1 as one GEMM (twice the width: better tensor-core use, one read of h, one weight-
    # gradient GEMM); the parameters stay separate, as in the official state dict.
    dt = self.w0.dtype
    k01 = jnp.concatenate([self.w0.kernel[...], self.w1.kernel[...]], axis=1).astype(dt)
    b01 = jnp.concatenate([self.w0.bias[...], self.w1.bias[...]]).astype(dt)
    return k01, b01

  def _mgpu_body(self, x: Array, tau: Array) -> Array:
    """norm -> GEMM + GEGLU kernel -> w2. The kernel takes rows in multiples of 8 (its TMA
    descriptors); a Transformer stage hands its tokens over as rows already padded
    (``Stage.flat_rows``: sampling has 250 x 257 = 64250), elsewhere ``geglu_gemm`` pads them (a
    pass of its own, which XLA fused neither before nor after the norm: NOTES rows 38, 42). The
    kernel returns the padded rows and the slice comes after w2, where it can fuse into the
    residual add instead of copying the wide hidden activation. A shared time's norm scale is one
    (1, C) row, so the norm works on flat rows."""
    g, rows = self._mgpu_hidden(x, tau)
    return self._w2_rows(g, rows, x.shape[:-1])

  def _w2_rows(self, g: Array, rows: int, lead: tuple[int, ...]) -> Array:
    """w2 on the kernel's padded rows, then the real ``rows`` back in x's leading shape."""
    return self.w2(g)[:rows].reshape(*lead, self.w2.kernel.shape[-1])

  def _mgpu_hidden(self, x: Array, tau: Array) -> tuple[Array, int]:
    """norm -> GEMM + GEGLU kernel: the hidden activation as padded rows, and the real rows."""
    rows, d = math.prod(x.shape[:-1]), x.shape[-1]
    h = self.norm(x.reshape(rows, d), tau).astype(self.w0.dtype)
    return geglu_gemm_mgpu.geglu_gemm(h, *self._weights01(), padded_rows=True), rows

  def _body(self, xn: Array) -> Array:
    """The MLP on the normalised input."""
    return self.w2(self._hidden(xn))

  def _hidden(self, xn: Array) -> Array:
    """``gelu(w0(xn)) * w1(xn)``, the input of w2."""
    dt = self.w0.dtype
    h = xn.astype(dt)
    k01, b01 = self._weights01()
    if self.fused_gemm and kernel_mesh() is None:  # the GEGLU in the GEMM's epilogue
      return geglu_gemm_kernel.geglu_gemm(h, k01, b01)
    h01 = jnp.matmul(h, k01, preferred_element_type=_acc(dt)).astype(dt)
    # The bias goes to the GEGLU pass: XLA fuses the add into its gelu*mul fusion, the Pallas
    # kernel adds it itself (one read of the GEMM output, no separate add).
    if self.geglu_impl == "pallas" and (mesh := kernel_mesh()) is not None:
      g = _per_device(functools.partial(geglu_kernel.geglu, impl="pallas"), h01, b01, mesh=mesh)
      return g if g is not None else geglu_kernel.geglu(h01, b01, impl="xla")
    return geglu_kernel.geglu(h01, b01, impl=self.geglu_impl)


PALLAS_OPS = ("dense_residual_mgpu", "dwconv", "dwconv_mgpu", "feature_stats", "geglu",
              "geglu_gemm", "geglu_gemm_mgpu", "geglu_gemm_narrow", "rmsnorm", "rmsnorm_bwd")
# 'feature_stats': the features handed to the next stage (concatenation) and their per-token
# layer-norm statistics for its folded upsampler norm in one Pallas pass, where the time is
# batch-shared (sampling; feature_stats_kernel.py).
# 'dwconv_mgpu': the ConvNeXt block's x + b + dwconv(x) as a Mosaic GPU (Hopper) kernel staged in
# shared memory (dwconv_mgpu.py), forward and data gradient (XLA's weight gradient), bf16 models.
# 'dense_residual_mgpu': the ConvNeXt MLPs' w2 GEMM with its bias and the residual add in the
# epilogue, a Mosaic GPU (Hopper) kernel (dense_residual_mgpu.py), forward only (XLA's backward);
# opt-in: correct on an H200 but no faster than cuBLAS + XLA's add (NOTES row 45).
# 'geglu_gemm_mgpu': the Mosaic GPU (Hopper) GEMM with the GEGLU in its epilogue, used only where
# the time is batch-shared (sampling); needs an sm_90 GPU (geglu_gemm_mgpu.py).
# Under a multi-device mesh (kernel_mesh) only 'geglu' runs, per device; the others fall back to
# XLA's ops (XLA would gather a custom call's operands onto every device).
# 'rmsnorm_bwd': TD-RMSNorm's Pallas backward only (its forward stays on XLA, fused with the
# residual add); opt-in: the XL b128 train step measured slower with it (NOTES row 32).
# 'geglu_gemm_narrow': the fused GEMM + GEGLU kernel only in MLPs narrower than this (the
# ConvNeXt stages): at K = 480 it beat cuBLAS + the GEGLU pass, at K = 960 it lost (NOTES row 26).
GEGLU_GEMM_NARROW_BELOW = 768
AUTO_PALLAS_OPS = ("feature_stats", "geglu")  # measured faster in the model (benchmarks/NOTES.md)
# 'feature_stats' (NOTES row 47): G/2R guided sampling +2.1% on an H200 (335.8 -> 342.7).
# ... plus, on a Hopper GPU, the Mosaic GPU GEMM + GEGLU for sampling (NOTES row 38: XL +4.5%,
# G +5.5% guided sampling; it adds ~80-120 s to a sampling step's compile).
# ... and the shared-memory depthwise conv (NOTES row 43: XL +4.1%, G +3.4% guided sampling; its
# forward in training: XL b128 +2.6%, G b64 +1.4%).
AUTO_HOPPER_OPS = ("geglu_gemm_mgpu", "dwconv_mgpu")


def auto_pallas_ops() -> tuple[str, ...]:
  """What 'auto' means on this device for a 16-bit model (see :func:`resolve_pallas_ops`)."""
  if not (pallas_util.available() and jax.default_backend() in ("gpu", "cuda")):
    return ()
  return AUTO_PALLAS_OPS + (AUTO_HOPPER_OPS if geglu_gemm_mgpu.available() else ())


def resolve_pallas_ops(spec: str | None, dtype: Any) -> tuple[str, ...]:
  """Which ops run as Pallas kernels: 'auto' (or None) = :func:`auto_pallas_ops` on GPU in 16-bit,
  none elsewhere (the float32 path stays on XLA, pinned by the fixture tests); '' = none; or a comma
  list of :data:`PALLAS_OPS` (off GPU they run in Pallas' interpret mode: slow, for tests)."""
  have_triton = pallas_util.available()
  if spec is None or spec == "auto":
    return auto_pallas_ops() if jnp.dtype(dtype).itemsize == 2 else ()
  ops = tuple(sorted({o.strip() for o in spec.split(",") if o.strip()}))
  unknown = [o for o in ops if o not in PALLAS_OPS]
  if unknown:
    raise ValueError(f"pallas_ops: unknown op(s) {unknown}; use 'auto', '' or a comma list of "
                     f"{list(PALLAS_OPS)}")
  if ops and not have_triton:
    raise ValueError(f"pallas_ops={spec!r}: this jax has no Pallas Triton backend; use "
                     "pallas_ops='' (XLA) or a jax release that still ships it")
  for op, module in (("dwconv_mgpu", dwconv_mgpu), ("geglu_gemm_mgpu", geglu_gemm_mgpu),
                     ("dense_residual_mgpu", dense_residual_mgpu)):
    if op in ops and not module.available():
      raise ValueError(f"pallas_ops={spec!r}: {op!r} is a Mosaic GPU kernel for Hopper (sm_90) "
                       "GPUs and this device is not one; leave it out of pallas_ops")
  return ops


def resolve_attention_impl(impl: str | None, dtype: Any) -> str | None:
  """'' / None / 'auto': cuDNN flash attention on GPU in 16-bit, XLA otherwise."""
  if impl in (None, "", "auto"):
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 else "xla"
  if impl not in ("xla", "cudnn"):
    raise ValueError(f"attention_impl must be '', 'xla' or 'cudnn', got {impl!r}")
  return impl


# cuDNN's fused attention backward rejects 257 tokens ("Unsupported sequence length"); a multiple
# of 8 (264) runs forward and backward at the speed of 256 (benchmarks/attention.py).
ATTENTION_TOKEN_MULTIPLE = 8


def attention(q: Array, k: Array, v: Array, impl: str | None, *, scale: float | None = None,
              seq_len: int | None = None) -> Array:
  """Softmax attention, (B, N, H, hd) -> (B, N, H, hd), no mask beyond ``seq_len``.

  ``scale`` defaults to hd**-0.5. ``seq_len``: only the first seq_len tokens are real (the rest
  is padding: masked as keys, zero or don't-care as queries).

  cuDNN's fused kernel needs head_dim % 8 == 0 (XL's is 60) and a token count it tiles, so on
  the cuDNN path q, k, v are zero-padded here where the caller has not done it already: zero
  head channels add nothing to q.k and the extra output columns are dropped; padded keys are
  masked through ``key_value_seq_lengths``. An unpadded odd token count (seq_len == n, e.g. 257
  in sampling) goes to the forward kernel as it is; only a differentiated call pads
  (:func:`_cudnn_unpadded`).
  """
  b, n, _, hd = q.shape
  scale = hd ** -0.5 if scale is None else scale
  seq_len = n if seq_len is None else seq_len
  if impl != "cudnn":
    if seq_len < n:
      mask = jnp.arange(n) < seq_len
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl,
                                          mask=mask[None, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
  if seq_len == n and n % ATTENTION_TOKEN_MULTIPLE and hd % 8 == 0:
    return _cudnn_unpadded(q, k, v, scale)
  return _cudnn_padded(q, k, v, scale, seq_len)


def _cudnn_padded(q: Array, k: Array, v: Array, scale: float, seq_len: int) -> Array:
  """cuDNN attention with the token count padded to ATTENTION_TOKEN_MULTIPLE (keys past seq_len
  masked) and the head dim to a multiple of 8; output sliced back to q's shape."""
  b, n, _, hd = q.shape
  pad_n, pad_d = -n % ATTENTION_TOKEN_MULTIPLE, -hd % 8
  if pad_n or pad_d:
    pad = [(0, 0), (0, pad_n), (0, 0), (0, pad_d)]
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  lengths = jnp.full((b,), seq_len, jnp.int32) if seq_len < n + pad_n else None
  o = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn",
                                   query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  return o[:, :n, :, :hd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cudnn_unpadded(q: Array, k: Array, v: Array, scale: float) -> Array:
  """cuDNN attention on a token count its backward rejects (257), forward as it is.

  Evaluated without differentiation (sampling: the model leaves the tokens unpadded when every
  image shares one time) the forward kernel takes the 257 tokens directly. Differentiated, the
  forward and backward run on tokens padded to a multiple of 8 (masked), which the backward
  needs; training pads once per stage instead, so this fallback is for odd callers only.
  """
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def _cudnn_unpadded_fwd(q, k, v, scale):
  return jax.vjp(lambda q, k, v: _cudnn_padded(q, k, v, scale, q.shape[1]), q, k, v)


def _cudnn_unpadded_bwd(scale, pullback, g):
  del scale
  return pullback(g)


_cudnn_unpadded.defvjp(_cudnn_unpadded_fwd, _cudnn_unpadded_bwd)


class Attention(PreNormSubBlock):
  """Pre-norm multi-head self-attention with the official fused qkv layout.

  ``query_key_value`` output channels are ordered [q of all heads | k of all heads | v of all heads],
  head i using channels i*hd:(i+1)*hd within each third. No mask; scale hd**-0.5; the class token
  is attended like any other token.

  q, k and v come from three GEMMs on column blocks of that kernel (each output contiguous, as the
  attention kernel wants it, instead of strided slices of one (B, N, 3, H, hd) output). On the
  cuDNN path the head dim is padded to a multiple of 8 in the *weights* (zero columns of the qkv
  kernel, zero rows of the projection), so no activation is ever padded or sliced.
  """
  _scope = "attn"

  def __init__(self, dim: int, num_heads: int, norm_type: str, *, dtype: Any, rngs: nnx.Rngs,
               attention_impl: str | None = None, pallas_ops: tuple[str, ...] = ()):
    if dim % num_heads:
      raise ValueError(f"dim {dim} is not divisible by num_attention_heads {num_heads}")
    self.norm = make_norm(norm_type, dim, pallas_ops)
    self.query_key_value = Dense(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.dense = Dense(dim, dim, dtype=dtype, rngs=rngs)
    self.num_heads = num_heads
    self.attention_impl = resolve_attention_impl(attention_impl, dtype)

  def _body(self, xn: Array, seq_len: int | None = None) -> Array:
    """The attention on the normalised input."""
    b, n, d = xn.shape
    nh = self.num_heads
    hd = d // nh
    dt = self.query_key_value.dtype
    hdp = hd + (-hd % 8) if self.attention_impl == "cudnn" else hd
    xn = xn.astype(dt)
    w = self.query_key_value.kernel[...].astype(dt).reshape(d, 3, nh, hd)
    wo = self.dense.kernel[...].astype(dt).reshape(nh, hd, d)
    if hdp != hd:
      w = jnp.pad(w, [(0, 0), (0, 0), (0, 0), (0, hdp - hd)])
      wo = jnp.pad(wo, [(0, 0), (0, hdp - hd), (0, 0)])
    q, k, v = (jnp.matmul(xn, w[:, i].reshape(d, nh * hdp), preferred_element_type=_acc(dt))
               .astype(dt).reshape(b, n, nh, hdp) for i in range(3))
    o = attention(q, k, v, self.attention_impl, scale=hd ** -0.5, seq_len=seq_len)
    out = jnp.matmul(o.reshape(b, n, nh * hdp), wo.reshape(nh * hdp, d),
                     preferred_element_type=_acc(dt))
    return (out + self.dense.bias[...].astype(out.dtype)).astype(dt)


class TransformerBlock(nnx.Module):
  """``x + Attn(x)`` then ``x + MLP(x)`` (official names block1 / block2)."""

  def __init__(self, dim: int, hidden: int, num_heads: int, norm_type: str, *, dtype: Any,
               rngs: nnx.Rngs, attention_impl: str | None = None, pallas_ops: tuple[str, ...] = ()):
    self.block1 = Attention(dim, num_heads, norm_type, dtype=dtype, rngs=rngs,
                            attention_impl=attention_impl, pallas_ops=pallas_ops)
    self.block2 = GegluMLP(dim, hidden, norm_type, dtype=dtype, rngs=rngs, pallas_ops=pallas_ops)

  def __call__(self, x: Array, tau: Array, seq_len: int | None = None,
               tokens: tuple[int, int] | None = None) -> Array:
    """x: (B, N, C); or, with ``tokens`` = (B, N), the B*N tokens as flat rows padded to a row
    count the MLP's kernel takes (``Stage.flat_rows``): attention sees them as (B, N, C), the MLP
    runs on all rows and the padding rows ride along (they never mix with real tokens)."""
    if tokens is None:
      x = self.block1.residual(x, tau, seq_len=seq_len)
      return self.block2.residual(x, tau)
    b, n = tokens
    r, d = b * n, x.shape[-1]
    # the slice is an operand XLA can fuse into the norm's pass, the pad one it can fuse into the add
    a = self.block1(x[:r].reshape(b, n, d), tau, seq_len=seq_len)
    x = x + jnp.pad(a.reshape(r, d), ((0, x.shape[0] - r), (0, 0)))
    return self.block2.residual(x, tau)


class ConvNeXtBlock(nnx.Module):
  """DiMR's ConvNeXt variant: ``x + dwconv(x)`` (no norm, no activation), then ``x + MLP(x)``."""

  def __init__(self, dim: int, hidden: int, kernel_size: int, norm_type: str, *, dtype: Any,
               rngs: nnx.Rngs, pallas_ops: tuple[str, ...] = ()):
    pad = kernel_size // 2
    self.block1 = Conv(dim, dim, kernel_size, padding=((pad, pad), (pad, pad)), groups=dim,
                       dtype=dtype, rngs=rngs)
    self.block2 = GegluMLP(dim, hidden, norm_type, dtype=dtype, rngs=rngs, pallas_ops=pallas_ops,
                           fuse_residual=True)
    self.pallas_dwconv = "dwconv" in pallas_ops
    self.mgpu_dwconv = "dwconv_mgpu" in pallas_ops

  def __call__(self, x: Array, tau: Array) -> Array:
    with jax.named_scope("dwconv"):
      conv = self.block1
      k = conv.kernel.shape[0]
      if (self.mgpu_dwconv and jnp.dtype(conv.dtype) == jnp.bfloat16 and kernel_mesh() is None
          and dwconv_mgpu.plan(x.shape, k) is not None):
        # x + b + dwconv(x) staged in shared memory (Hopper), one rounding at the end (Conv rounds
        # the conv, then its bias, then the sum to the compute dtype: ~1 ulp apart in places)
        x = dwconv_mgpu.dwconv_residual(x.astype(conv.dtype),
                                        conv.kernel[...][:, :, 0, :].astype(conv.dtype),
                                        conv.bias[...])
      elif (self.pallas_dwconv and dwconv_kernel.supported(x.shape, k)
          and kernel_mesh() is None):
        # x + b + dwconv(x) in one kernel (opt-in: it measured no faster than cuDNN in the model,
        # benchmarks/NOTES.md row 22).
        x = dwconv_kernel.dwconv_residual(x.astype(conv.dtype), conv.kernel[...][:, :, 0, :],
                                          conv.bias[...])
      else:
        x = x + conv(x)
    return self.block2.residual(x, tau)


def pixel_shuffle(x: Array, r: int) -> Array:
  """(B,H,W,r*r*C) -> (B,H*r,W*r,C) with channel index (i*r+j)*C + c (NOT torch.nn.PixelShuffle)."""
  b, h, w, c = x.shape
  c_out = c // (r * r)
  x = x.reshape(b, h, w, r, r, c_out).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * r, w * r, c_out)


def area_downsample(x: Array, r: int) -> Array:
  """F.interpolate(mode='area') by an integer factor: r x r average pooling."""
  if r == 1:
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // r, r, w // r, r, c).mean(axis=(2, 4))
