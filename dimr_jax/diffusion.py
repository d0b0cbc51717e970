"""DiMR's diffusion process: the discrete SD schedule, the multi-scale loss, the solver's VP view.

Two views of one schedule are used by the official code and both live here:

* The **discrete** view of training (``train.py``'s ``Schedule``): SD "scaled-linear" betas in
  float64, ``alpha_bar[n] = prod_{k<=n} (1 - beta_k)`` with index 0 = no noise, ``n ~ U{1..1000}``,
  ``x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps`` and the network time input
  ``n/1000*8 - 4``. Tables are numpy float64 (as the official numpy code); only their float32 casts
  enter jitted code, so nothing here needs ``jax_enable_x64``.
* The **continuous** view of sampling (``dpm_solver.py``'s ``NoiseScheduleVP('discrete')``): log
  alpha piecewise-linear in t over the knots ``t_k = k/1000`` (all float32, like torch), plus sigma,
  lambda and inverse lambda as jnp functions. ``t = n/1000`` lines up with the discrete step ``n``.

Everything is NHWC. Small numerical details (torch's linspace rounding, float64 sqrt then float32
cast) are reproduced on purpose: the fixtures in ``shared/fixtures`` compare at 1e-6.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


# ------------------------------------------------------------------------------------------------
# torch.linspace, bit for bit. Both the betas and the solver's time grids are built with it, and
# numpy's linspace rounds differently (1 ulp at some entries).
# ------------------------------------------------------------------------------------------------

def torch_linspace_at(start: float, end: float, num: int, i: np.ndarray,
                      dtype: Any = np.float32) -> np.ndarray:
  """Entries ``i`` of ``torch.linspace(start, end, num, dtype=dtype)`` on CPU, reproduced in numpy.

  Torch computes ``step = (end - start) / (num - 1)`` in the output dtype, then ``start + step*i``
  for the first half and ``end - step*(num-1-i)`` for the second, each as one fused multiply-add.
  The FMA is emulated by doing the product and sum in a wider type (exact product, one rounding).
  Evaluating single entries lets a 10M-point grid be searched without materialising it.
  """
  dtype = np.dtype(dtype)
  wide = np.float64 if dtype == np.float32 else np.longdouble
  start, end = dtype.type(start), dtype.type(end)
  i = np.asarray(i, np.int64)
  if num == 1:
    return np.full(i.shape, start, dtype)
  step = dtype.type((end - start) / dtype.type(num - 1))
  lo = (wide(start) + wide(step) * i.astype(wide)).astype(dtype)
  hi = (wide(end) - wide(step) * (num - 1 - i).astype(wide)).astype(dtype)
  return np.where(i < num // 2, lo, hi).astype(dtype)


def torch_linspace(start: float, end: float, num: int, dtype: Any = np.float32) -> np.ndarray:
  """``torch.linspace(start, end, num, dtype)`` bit for bit (see :func:`torch_linspace_at`)."""
  return torch_linspace_at(start, end, num, np.arange(num), dtype)


# ------------------------------------------------------------------------------------------------
# Discrete schedule (training).
# ------------------------------------------------------------------------------------------------

@functools.cache
def sd_betas(num_timesteps: int = NUM_TIMESTEPS, beta_start: float = BETA_START,
             beta_end: float = BETA_END) -> np.ndarray:
  """SD scaled-linear betas: ``linspace(sqrt(b0), sqrt(b1), N, float64) ** 2`` (N,), read-only."""
  betas = torch_linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, np.float64) ** 2
  betas.flags.writeable = False
  return betas


@functools.cache
def _discrete_tables(num_timesteps: int = NUM_TIMESTEPS) -> dict[str, np.ndarray]:
  """The official ``Schedule`` tables, float64, indexed by n = 0..N (index 0 = no noise).

  ``cum_betas`` follows ``train.get_skip``: a sum of ``beta_k * prod_{j>k} alpha_j``, which equals
  ``1 - alpha_bar`` mathematically; it is computed the official way so the float64 values agree.
  """
  betas = np.append(0.0, sd_betas(num_timesteps))
  alphas = 1.0 - betas
  cum_alphas = np.cumprod(alphas)  # == skip_alphas[0] of get_skip
  # cum_betas[t] = skip_betas[0, t] = sum_{k=1..t} betas[k] * prod(alphas[k+1..t]), where the
  # official prod is a forward cumprod starting at k+1 and the sum runs from k=t down to k=1.
  cum_betas = np.zeros_like(betas)
  skip_to = np.ones((num_timesteps + 1, num_timesteps + 1))  # skip_to[s, t] = prod alphas[s+1..t]
  for s in range(num_timesteps + 1):
    skip_to[s, s + 1:] = np.cumprod(alphas[s + 1:])
  for t in range(1, num_timesteps + 1):
    prod = betas[1:t + 1] * skip_to[1:t + 1, t]
    cum_betas[t] = np.cumsum(prod[::-1])[-1]
  tables = dict(betas=betas, alphas=alphas, cum_alphas=cum_alphas, cum_betas=cum_betas,
                # q_sample's coefficients: sqrt in float64, then float32 (torch's .type_as(x)).
                sqrt_cum_alphas_f32=np.sqrt(cum_alphas).astype(np.float32),
                sqrt_cum_betas_f32=np.sqrt(cum_betas).astype(np.float32))
  for v in tables.values():
    v.flags.writeable = False
  return tables


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """alpha_bar[n] for n = 0..N, float64, with alpha_bar[0] = 1 (the prepended beta = 0)."""
  return _discrete_tables(num_timesteps)["cum_alphas"]


def one_minus_alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """1 - alpha_bar[n] for n = 0..N, float64, computed as the official ``cum_betas``."""
  return _discrete_tables(num_timesteps)["cum_betas"]


def sample_timesteps(key: Array, batch: int, num_timesteps: int = NUM_TIMESTEPS) -> Array:
  """n ~ U{1..N}, int32 (B,), as ``np.random.choice(range(1, N + 1))`` in train.py."""
  return jax.random.randint(key, (batch,), 1, num_timesteps + 1, dtype=jnp.int32)


def true_divide(x: Array, denominator: float) -> Array:
  """x / denominator with a real division, as torch does.

  XLA rewrites a division by a broadcast scalar into a multiplication by its reciprocal, which is
  1 ulp off for about half of the inputs. Hiding the (tiny) denominator array behind an
  optimization barrier keeps the true division.
  """
  d = jax.lax.optimization_barrier(jnp.full(jnp.shape(x), denominator, jnp.float32))
  return x / d


def time_input(n: Array, num_timesteps: int = NUM_TIMESTEPS) -> Array:
  """Network time input for discrete steps n: ``(n.float() / 1000) * 8 - 4`` in float32.

  This is an affine time code in [-3.992, 4] that grows with noise, not the schedule's log-SNR,
  although the official code calls it ``log_snr``.
  """
  return true_divide(jnp.asarray(n).astype(jnp.float32), float(num_timesteps)) * 8.0 - 4.0


def time_input_from_continuous(t_continuous: Array, num_timesteps: int = NUM_TIMESTEPS) -> Array:
  """Network time input at the solver's continuous t, with eval.py's op order.

  ``t = t_cont * N; log_snr = (t / 1000) * 8 - 4`` (float32). Mathematically ``8 t_cont - 4``; the
  op order is kept because the two differ by an ulp at some t.
  """
  t = jnp.asarray(t_continuous, jnp.float32) * num_timesteps
  return true_divide(t, 1000.0) * 8.0 - 4.0


def expand_to(v: Array, x: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against x."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(x0: Array, n: Array, noise: Array, num_timesteps: int = NUM_TIMESTEPS) -> Array:
  """x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps, for integer n (B,) in 1..N.

  The coefficients are float64 sqrt cast to float32, then the product is float32, as
  ``stp(cum_alphas[n] ** 0.5, x0)`` does. Layout-agnostic (any trailing dims).
  """
  tables = _discrete_tables(num_timesteps)
  a = jnp.asarray(tables["sqrt_cum_alphas_f32"])[n]
  s = jnp.asarray(tables["sqrt_cum_betas_f32"])[n]
  x0, noise = x0.astype(jnp.float32), noise.astype(jnp.float32)
  return expand_to(a, x0) * x0 + expand_to(s, noise) * noise


# ------------------------------------------------------------------------------------------------
# Continuous-time VP view (sampling): NoiseScheduleVP(schedule='discrete').
# ------------------------------------------------------------------------------------------------

def interpolate_fn(x: Array, xp: Array, yp: Array) -> Array:
  """dpm_solver's ``interpolate_fn`` for 1-D increasing knots ``xp``, elementwise over x.

  Segment ``k = clip(#{xp < x} - 1, 0, K - 2)``; outside the knots the first / last segment is
  extended linearly (no clamping). Evaluated as
  ``y[k] + (x - x[k]) * (y[k+1] - y[k]) / (x[k+1] - x[k])`` in that order, like torch.
  """
  x = jnp.asarray(x, jnp.float32)
  # A plain count (no searchsorted loop): x is a handful of times, and loop-free HLO keeps the
  # compile of a sampler, which calls this ~10 times per step kind, fast.
  num_below = jnp.sum(xp < x[..., None], axis=-1)
  k = jnp.clip(num_below - 1, 0, xp.shape[0] - 2)
  x0, x1, y0, y1 = xp[k], xp[k + 1], yp[k], yp[k + 1]
  return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class Marginals(NamedTuple):
  """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) at the same times."""
  alpha: Array
  sigma: Array
  lam: Array


class NoiseScheduleVP:
  """``NoiseScheduleVP('discrete', betas)`` of DPM-Solver, with jnp methods (float32).

  ``log alpha(t)`` is piecewise linear through ``(t_k, 0.5 * cumsum(log(1 - beta))_k)`` with
  ``t_k = linspace(1/N, 1, N)``; the tables are built like the torch code from float32 betas, so
  the knot values match it (up to torch's float32 log, 1 ulp at 2 of 1000 knots).
  """

  def __init__(self, betas: np.ndarray | None = None):
    betas = sd_betas() if betas is None else np.asarray(betas)
    betas32 = betas.astype(np.float32)
    n = betas32.shape[0]
    # torch: 0.5 * torch.log(1 - betas).cumsum(0): 1 - b and log in float32 (taken here as the
    # correctly rounded float32 log), cumsum accumulated in float64 (torch's CPU acc type) and
    # rounded per element.
    log_one_minus = np.log((np.float32(1.0) - betas32).astype(np.float64)).astype(np.float32)
    cums = np.cumsum(log_one_minus.astype(np.float64)).astype(np.float32)
    self.total_n = n
    self.T = 1.0
    self.t_discrete = torch_linspace(1.0 / n, 1.0, n, np.float32)
    self.log_alpha_discrete = (np.float32(0.5) * cums).astype(np.float32)

  def marginal_log_mean_coeff(self, t: Array) -> Array:
    """log alpha_t."""
    return interpolate_fn(t, jnp.asarray(self.t_discrete), jnp.asarray(self.log_alpha_discrete))

  def marginal_alpha(self, t: Array) -> Array:
    return jnp.exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t: Array) -> Array:
    """sigma_t = sqrt(1 - alpha_t^2)."""
    return self.marginals(t).sigma

  def marginal_lambda(self, t: Array) -> Array:
    """Half log-SNR: lambda_t = log alpha_t - log sigma_t."""
    return self.marginals(t).lam

  def marginals(self, t: Array) -> Marginals:
    """alpha, sigma and lambda at t from ONE log-alpha lookup, with the formulas above.

    The solver needs all three at the same times; one interpolation instead of three keeps
    its traced program (and compile time) small. Values equal the single-quantity methods.
    """
    lmc = self.marginal_log_mean_coeff(t)
    one_minus_alpha2 = 1.0 - jnp.exp(2.0 * lmc)
    return Marginals(alpha=jnp.exp(lmc), sigma=jnp.sqrt(one_minus_alpha2),
                     lam=lmc - 0.5 * jnp.log(one_minus_alpha2))

  def inverse_lambda(self, lamb: Array) -> Array:
    """t with lambda_t = lamb, by piecewise-linear interpolation in log alpha (extrapolates)."""
    lamb = jnp.asarray(lamb, jnp.float32)
    log_alpha = -0.5 * jnp.logaddexp(jnp.zeros_like(lamb), -2.0 * lamb)
    return interpolate_fn(log_alpha, jnp.asarray(self.log_alpha_discrete[::-1].copy()),
                          jnp.asarray(self.t_discrete[::-1].copy()))


@functools.cache
def vp_schedule() -> NoiseScheduleVP:
  """The schedule DiMR samples with: SD betas, cast to float32 as eval.py does."""
  return NoiseScheduleVP(sd_betas())


# ------------------------------------------------------------------------------------------------
# Multi-scale loss.
# ------------------------------------------------------------------------------------------------

def default_loss_coeffs(num_outputs: int) -> list[float]:
  """Per-output weights, low-res first: 4^-(R-1-i), i.e. [1/4, 1] (official 2R), [1/16, 1/4, 1].

  Only the 2R values are released; the 3R default continues the same 1/4 per octave.
  """
  return [4.0 ** -(num_outputs - 1 - i) for i in range(num_outputs)]


def multiscale_targets(noise: Array, sizes: Sequence[int]) -> list[Array]:
  """Noise targets per output width: ``k * AvgPool_k(noise)`` with ``k = W_full / W_r`` (NHWC).

  This is ``even_multi_scale_targets(..., scale_correction=True)``: a ones/k kernel with stride k,
  i.e. the k x k block sum divided by k, which keeps unit variance for iid noise.
  """
  b, h, w, c = noise.shape
  targets = []
  for size in sizes:
    if w % size or h % (w // size):
      raise ValueError(f"output width {size} does not divide the noise shape {noise.shape}")
    k = w // size
    if k == 1:
      targets.append(noise.astype(jnp.float32))
      continue
    blocks = noise.astype(jnp.float32).reshape(b, h // k, k, w // k, k, c)
    targets.append(blocks.sum(axis=(2, 4)) / k)
  return targets


def multiscale_loss(preds: Sequence[Array], noise: Array, coeffs: Sequence[float] | None = None
                    ) -> tuple[Array, Array, list[Array]]:
  """LSimple over all resolutions.

  Args:
    preds: NHWC eps predictions, low-res first (the network's outputs).
    noise: NHWC noise at full resolution.
    coeffs: per-output weights, low-res first; default :func:`default_loss_coeffs`.
  Returns:
    ``(mean_loss, per_sample, per_resolution)``: the batch mean of ``per_sample`` (what is
    differentiated), ``per_sample = sum_r c_r * mean_{HWC}(pred_r - T_r)^2`` (B,), and per output
    the batch-mean *unweighted* MSE (for logging).
  """
  preds = list(preds)
  if coeffs is None:
    coeffs = default_loss_coeffs(len(preds))
  if len(coeffs) != len(preds):
    raise ValueError(f"{len(preds)} predictions but {len(coeffs)} loss coefficients")
  targets = multiscale_targets(noise, [p.shape[2] for p in preds])
  per_sample = 0.0
  per_resolution = []
  for c, p, t in zip(coeffs, preds, targets):
    if p.shape != t.shape:
      raise ValueError(f"prediction shape {p.shape} != target shape {t.shape}")
    mse = jnp.mean(jnp.square(p.astype(jnp.float32) - t), axis=(1, 2, 3))
    per_sample = per_sample + c * mse
    per_resolution.append(jnp.mean(mse))
  return jnp.mean(per_sample), per_sample, per_resolution


def label_dropout(key: Array, y: Array, p: float, null_class: int) -> Array:
  """Replaces each label by ``null_class`` independently with probability p (CFGDataset's rule)."""
  if isinstance(p, (int, float)) and p <= 0.0:  # static no-op (p may also be traced)
    return y
  drop = jax.random.uniform(key, y.shape) < p
  return jnp.where(drop, jnp.asarray(null_class, y.dtype), y)


def diffusion_loss(apply_fn: Callable[[Array, Array, Array], Sequence[Array]], x0: Array, y: Array,
                   key: Array, *, coeffs: Sequence[float] | None = None, p_uncond: float = 0.1,
                   null_class: int = 1000) -> tuple[Array, dict[str, Array]]:
  """One training loss evaluation: label dropout, n ~ U{1..1000}, noising, multi-scale LSimple.

  Args:
    apply_fn: ``apply_fn(x_t, time_in, y) -> [eps_lowres, ..., eps_full]`` (NHWC).
    x0: clean NHWC latents (B, H, W, C).
    y: int labels (B,).
    key: PRNG key; split into timestep, noise and dropout keys.
  Returns:
    ``(loss, aux)``; aux holds ``loss_<W>`` (unweighted MSE per output width W), ``per_sample`` and
    the sampled ``n``.
  """
  k_n, k_eps, k_drop = jax.random.split(key, 3)
  n = sample_timesteps(k_n, x0.shape[0])
  noise = jax.random.normal(k_eps, x0.shape, jnp.float32)
  x_t = q_sample(x0, n, noise)
  y = label_dropout(k_drop, y, p_uncond, null_class)
  preds = apply_fn(x_t, time_input(n), y)
  loss, per_sample, per_res = multiscale_loss(preds, noise, coeffs)
  aux = {f"loss_{p.shape[2]}": l for p, l in zip(preds, per_res)}
  aux.update(per_sample=per_sample, n=n)
  return loss, aux
