"""Samplers for DiMR: DPM-Solver++ exactly as the official eval runs it, DDPM, and guidance.

DiMR's ``eval.py`` samples with ``DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas),
predict_x0=True).sample(z, steps=250, eps=1/1000, T=1.)``, i.e. DPM-Solver++ (data prediction),
``method='fast'``: singlestep updates of order 3 with a lower-order tail, on a *time-uniform* grid
``linspace(1, 1e-3, steps + 1)`` (the 'fast' logSNR grid of the original DPM-Solver is computed and
thrown away in this version of the file). :func:`dpm_solver_sample` reproduces that, plus the file's
'singlestep' and 'multistep' methods and its 'logSNR' / 'time_quadratic' grids.

How it maps onto JAX: the schedule (orders, grid, which step uses which times) is static Python
known at trace time; runs of identical updates become one ``lax.scan``, so a 250-step sample traces
the network a handful of times, not 250, and nothing syncs with the host. All samplers are
traceable: wrap them in ``jax.jit`` (``sample_images`` does). They only use ``eps_fn(x, t)`` with
``t`` of shape (B,) and elementwise arithmetic on x, so any layout (NHWC here, NCHW in the fixtures)
works.

Name mapping to the official ``sample()``: ``eps`` -> ``t_end``, ``T`` -> ``t_start``; ``method``,
``order``, ``skip_type``, ``solver_type``, ``denoise`` keep their names.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dimr_jax import diffusion

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

METHODS = ("fast", "singlestep", "multistep")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
SOLVER_TYPES = ("dpm_solver", "taylor")
SAMPLERS = ("dpm_solver", "ddpm")


# ------------------------------------------------------------------------------------------------
# Time grids and order plans (static, host-side where possible).
# ------------------------------------------------------------------------------------------------

def _linspace_traced(start: Array, end: Array, num: int) -> Array:
  """torch.linspace's rule for traced float32 endpoints (used by the logSNR grid)."""
  step = (end - start) / (num - 1)
  i = jnp.arange(num, dtype=jnp.float32)
  return jnp.where(jnp.arange(num) < num // 2, start + step * i, end - step * (num - 1 - i))


@functools.lru_cache(maxsize=64)
def _time_quadratic_grid(t_start: float, t_end: float, num: int) -> np.ndarray:
  """The official 'time_quadratic' grid, without materialising its 10M-point helper array.

  Official: ``t = linspace(t_0, t_T, 1e7); q = sqrt(t); qs = linspace(q[0], q[-1], N+1);
  flip(cat([t[searchsorted(q, qs)[:-1]], [t_T]]))``. The left-searchsorted is a vectorised
  bisection over entries of ``t`` computed on demand.
  """
  n_fine = 10_000_000
  fine = functools.partial(diffusion.torch_linspace_at, t_end, t_start, n_fine)
  q_first, q_last = np.sqrt(fine(0)), np.sqrt(fine(n_fine - 1))
  targets = diffusion.torch_linspace(q_first, q_last, num + 1)
  lo = np.zeros(num + 1, np.int64)
  hi = np.full(num + 1, n_fine, np.int64)
  while np.any(lo < hi):
    active = lo < hi
    mid = (lo + hi) // 2
    ge = np.sqrt(fine(np.minimum(mid, n_fine - 1))) >= targets
    hi = np.where(active & ge, mid, hi)
    lo = np.where(active & ~ge, mid + 1, lo)
  grid = np.concatenate([fine(lo[:-1]), np.array([t_start], np.float32)])[::-1]
  return np.ascontiguousarray(grid, np.float32)


def get_time_steps(skip_type: str, t_start: float, t_end: float, num: int,
                   schedule: diffusion.NoiseScheduleVP | None = None) -> Array:
  """``DPM_Solver.get_time_steps``: (num + 1,) float32 times from t_start down to t_end."""
  if skip_type == "time_uniform":
    return jnp.asarray(diffusion.torch_linspace(t_start, t_end, num + 1))
  if skip_type == "time_quadratic":
    return jnp.asarray(_time_quadratic_grid(float(t_start), float(t_end), int(num)))
  if skip_type == "logSNR":
    ns = schedule or diffusion.vp_schedule()
    lam_start = ns.marginal_lambda(jnp.float32(t_start))
    lam_end = ns.marginal_lambda(jnp.float32(t_end))
    return ns.inverse_lambda(_linspace_traced(lam_start, lam_end, num + 1))
  raise ValueError(f"unknown skip_type {skip_type!r}; expected one of {SKIP_TYPES}")


def fast_orders(steps: int, order: int) -> list[int]:
  """Order plan of method='fast' (``get_time_steps_for_dpm_solver_fast``); sums to ``steps``."""
  if order == 3:
    k = steps // 3 + 1
    if steps % 3 == 0:
      return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
  if order == 2:
    return [2] * (steps // 2) + [1] * (steps % 2)
  raise ValueError(f"method='fast' needs order 2 or 3, got {order}")


def _validate(steps: int, order: int, method: str, skip_type: str, solver_type: str,
              t_start: float, t_end: float) -> None:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  valid_orders = (2, 3) if method == "fast" else (1, 2, 3)
  if order not in valid_orders:
    raise ValueError(f"method={method!r} supports order in {valid_orders}, got {order!r}")
  if method in ("singlestep", "multistep") and steps < order:
    raise ValueError(f"method={method!r} with order {order} needs steps >= {order}, got {steps}")
  if skip_type not in SKIP_TYPES:
    raise ValueError(f"unknown skip_type {skip_type!r}; expected one of {SKIP_TYPES}")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"unknown solver_type {solver_type!r}; expected one of {SOLVER_TYPES}")
  if not 0.0 < t_end < t_start:
    raise ValueError(f"need 0 < t_end < t_start, got t_end={t_end}, t_start={t_start}")


# ------------------------------------------------------------------------------------------------
# DPM-Solver++ updates (predict_x0=True), transcribed from the official file. Times are 0-d float32
# arrays (every batch entry shares them); the official per-sample (B,) vectors hold equal values.
# ------------------------------------------------------------------------------------------------

class _DPMSolverPP:
  """The update rules of ``DPM_Solver(predict_x0=True, thresholding=False)``.

  Each schedule quantity is the official one; they are only grouped so that all times of an
  update share one table lookup (``marginals`` of a stacked vector), and the model's x0 conversion
  reuses the alpha / sigma already computed for its time.
  """

  def __init__(self, eps_fn: EpsFn, ns: diffusion.NoiseScheduleVP, solver_type: str, batch: int):
    self.eps_fn = eps_fn
    self.ns = ns
    self.solver_type = solver_type
    self.batch = batch

  def at(self, *times: Array) -> list[diffusion.Marginals]:
    """Marginals at each of ``times`` (0-d), from one lookup."""
    m = self.ns.marginals(jnp.stack(times))
    return [diffusion.Marginals(m.alpha[i], m.sigma[i], m.lam[i]) for i in range(len(times))]

  def data_pred(self, x: Array, t: Array, m: diffusion.Marginals | None = None) -> Array:
    """x0 = (x - sigma_t eps) / alpha_t, the DPM-Solver++ 'model'."""
    m = self.at(t)[0] if m is None else m
    eps = self.eps_fn(x, jnp.full((self.batch,), t, jnp.float32)).astype(jnp.float32)
    return (x - m.sigma * eps) / m.alpha

  def first_update(self, x, s, t, m_s, ms=None):
    """Order 1 from s to t given the x0 prediction m_s at s."""
    ms_, mt = ms or self.at(s, t)
    h = mt.lam - ms_.lam
    phi_1 = (jnp.exp(-h) - 1.0) / (-1.0)
    return (mt.sigma / ms_.sigma) * x + (mt.alpha * phi_1) * m_s

  def second_update(self, x, s, t, r1=None):
    r1 = 0.5 if r1 is None else r1
    ms, mt = self.at(s, t)
    h = mt.lam - ms.lam
    s1 = self.ns.inverse_lambda(ms.lam + r1 * h)
    (ms1,) = self.at(s1)
    phi_11 = jnp.expm1(-r1 * h)
    phi_1 = jnp.expm1(-h)
    m_s = self.data_pred(x, s, ms)
    x_s1 = (ms1.sigma / ms.sigma) * x - (ms1.alpha * phi_11) * m_s
    m_s1 = self.data_pred(x_s1, s1, ms1)
    if self.solver_type == "dpm_solver":
      return ((mt.sigma / ms.sigma) * x - (mt.alpha * phi_1) * m_s
              - (0.5 / r1) * (mt.alpha * phi_1) * (m_s1 - m_s))
    return ((mt.sigma / ms.sigma) * x - (mt.alpha * phi_1) * m_s
            + (1.0 / r1) * (mt.alpha * ((jnp.exp(-h) - 1.0) / h + 1.0)) * (m_s1 - m_s))

  def third_update(self, x, s, t, r1=None, r2=None):
    r1 = 1.0 / 3.0 if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    ms, mt = self.at(s, t)
    h = mt.lam - ms.lam
    s12 = self.ns.inverse_lambda(jnp.stack([ms.lam + r1 * h, ms.lam + r2 * h]))
    s1, s2 = s12[0], s12[1]
    ms1, ms2 = self.at(s1, s2)
    phi_11 = jnp.expm1(-r1 * h)
    phi_12 = jnp.expm1(-r2 * h)
    phi_1 = jnp.expm1(-h)
    phi_22 = jnp.expm1(-r2 * h) / (r2 * h) + 1.0
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    m_s = self.data_pred(x, s, ms)
    x_s1 = (ms1.sigma / ms.sigma) * x - (ms1.alpha * phi_11) * m_s
    m_s1 = self.data_pred(x_s1, s1, ms1)
    x_s2 = ((ms2.sigma / ms.sigma) * x - (ms2.alpha * phi_12) * m_s
            + r2 / r1 * (ms2.alpha * phi_22) * (m_s1 - m_s))
    m_s2 = self.data_pred(x_s2, s2, ms2)
    if self.solver_type == "dpm_solver":
      return ((mt.sigma / ms.sigma) * x - (mt.alpha * phi_1) * m_s
              + (1.0 / r2) * (mt.alpha * phi_2) * (m_s2 - m_s))
    d1_0 = (1.0 / r1) * (m_s1 - m_s)
    d1_1 = (1.0 / r2) * (m_s2 - m_s)
    d1 = (r2 * d1_0 - r1 * d1_1) / (r2 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r2 - r1)
    return ((mt.sigma / ms.sigma) * x - (mt.alpha * phi_1) * m_s
            + (mt.alpha * phi_2) * d1 - (mt.alpha * phi_3) * d2)

  def singlestep_update(self, x, s, t, order, r1=None, r2=None):
    if order == 1:
      ms, mt = self.at(s, t)
      return self.first_update(x, s, t, self.data_pred(x, s, ms), (ms, mt))
    if order == 2:
      return self.second_update(x, s, t, r1)
    return self.third_update(x, s, t, r1, r2)

  def multistep_update(self, x, m_prev: Sequence[Array], t_prev: Sequence[Array], t, order):
    """One multistep update of ``order`` from the last ``order`` history entries."""
    if order == 1:
      return self.first_update(x, t_prev[-1], t, m_prev[-1])
    marg = self.at(*t_prev[-order:], t)
    mp0, mt = marg[-2], marg[-1]
    mp1 = marg[-3]
    h_0 = mp0.lam - mp1.lam
    h = mt.lam - mp0.lam
    r0 = h_0 / h
    d1_0 = (1.0 / r0) * (m_prev[-1] - m_prev[-2])
    if order == 2:
      if self.solver_type == "taylor":
        return ((mt.sigma / mp0.sigma) * x - (mt.alpha * (jnp.exp(-h) - 1.0)) * m_prev[-1]
                + (mt.alpha * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1_0)
      return ((mt.sigma / mp0.sigma) * x - (mt.alpha * (jnp.exp(-h) - 1.0)) * m_prev[-1]
              - 0.5 * (mt.alpha * (jnp.exp(-h) - 1.0)) * d1_0)
    # Third order (the official file has no solver_type switch here).
    mp2 = marg[-4]
    h_1 = mp1.lam - mp2.lam
    r1 = h_1 / h
    d1_1 = (1.0 / r1) * (m_prev[-2] - m_prev[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return ((mt.sigma / mp0.sigma) * x - (mt.alpha * (jnp.exp(-h) - 1.0)) * m_prev[-1]
            + (mt.alpha * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
            - (mt.alpha * ((jnp.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)


def _scan(step: Callable[[Any, Any], Any], carry: Any, xs: Any) -> Any:
  """carry = step(carry, x) over the leading axis of xs: lax.scan, or a plain call for length 1."""
  length = jax.tree.leaves(xs)[0].shape[0]
  if length == 1:
    return step(carry, jax.tree.map(lambda a: a[0], xs))
  carry, _ = jax.lax.scan(lambda c, x: (step(c, x), None), carry, xs)
  return carry


def _sample_singlestep_plan(solver: _DPMSolverPP, x: Array, grid: Array, orders: Sequence[int],
                            fast: bool) -> Array:
  """Singlestep updates; update i of order o goes from grid[i] to grid[i + o] ('fast') or
  grid[j] to grid[j + 1] ('singlestep'). 'fast' takes r1, r2 from the grid's lambdas."""
  lam = solver.ns.marginal_lambda(grid) if fast else None
  starts = np.cumsum([0] + list(orders[:-1])) if fast else np.arange(len(orders))
  pos = 0
  for order, group in itertools.groupby(orders):
    n = len(list(group))
    i = starts[pos:pos + n]
    pos += n
    stride = order if fast else 1
    xs = dict(s=grid[i], t=grid[i + stride])
    if fast and order >= 2:
      h = lam[i + order] - lam[i]
      xs["r1"] = (lam[i + 1] - lam[i]) / h
      if order >= 3:
        xs["r2"] = (lam[i + 2] - lam[i]) / h

    def step(x, c, order=order):
      return solver.singlestep_update(x, c["s"], c["t"], order, c.get("r1"), c.get("r2"))

    x = _scan(step, x, xs)
  return x


def _sample_multistep(solver: _DPMSolverPP, x: Array, grid: Array, steps: int, order: int,
                      lower_order_final: bool) -> Array:
  """The official multistep loop (with its one-line ``timesteps = None`` fix applied)."""
  m_prev = [solver.data_pred(x, grid[0])]
  t_prev = [grid[0]]
  for k in range(1, order):  # warm-up with lower orders
    x = solver.multistep_update(x, m_prev, t_prev, grid[k], k)
    m_prev.append(solver.data_pred(x, grid[k]))
    t_prev.append(grid[k])

  if lower_order_final and steps < 10:
    # Later DPM-Solver releases end few-step runs with lower orders; not in DiMR's file.
    for step in range(order, steps + 1):
      x = solver.multistep_update(x, m_prev, t_prev, grid[step], min(order, steps + 1 - step))
      m_prev, t_prev = m_prev[1:] + [m_prev[-1]], t_prev[1:] + [grid[step]]
      if step < steps:
        m_prev[-1] = solver.data_pred(x, grid[step])
    return x

  def step(carry, t):
    x, m_prev, t_prev = carry
    x = solver.multistep_update(x, m_prev, t_prev, t, order)
    return x, m_prev[1:] + (solver.data_pred(x, t),), t_prev[1:] + (t,)

  # Steps order..steps-1 update and re-evaluate the model; the last step only updates.
  carry = (x, tuple(m_prev), tuple(t_prev))
  if steps > order:
    carry = _scan(step, carry, grid[order:steps])
  x, m_prev, t_prev = carry
  return solver.multistep_update(x, m_prev, t_prev, grid[steps], order)


def dpm_solver_sample(eps_fn: EpsFn, x_T: Array, *, steps: int, order: int = 3,
                      method: str = "fast", skip_type: str = "time_uniform", t_end: float = 1e-3,
                      t_start: float = 1.0, solver_type: str = "dpm_solver",
                      lower_order_final: bool = False, denoise: bool = False,
                      schedule: diffusion.NoiseScheduleVP | None = None) -> Array:
  """DPM-Solver++ (data prediction) from ``t_start`` to ``t_end``, as DiMR's ``dpm_solver.py``.

  Args:
    eps_fn: ``eps_fn(x, t) -> eps`` with ``t`` the continuous time, shape (B,). For DiMR this is
      :func:`guided_eps_fn` (network time input ``t*8 - 4``).
    x_T: initial noise (B, ...), any layout.
    steps: number of model evaluations for 'fast' and 'multistep'; 'singlestep' runs
      ``steps // order`` updates of ``order`` evaluations each (the official rule).
    order: 'fast': 2 or 3; 'singlestep' / 'multistep': 1, 2 or 3.
    method: 'fast' (DiMR's eval: singlestep with orders [3, ..., 3] + [2, 1] | [1] | [2], NFE =
      steps), 'singlestep' or 'multistep'.
    skip_type: 'time_uniform' (DiMR), 'logSNR' or 'time_quadratic'. 'fast' uses it for its
      steps + 1 point grid, as the official code does (despite its docstring).
    t_end, t_start: the official ``eps`` (1/1000 in DiMR) and ``T`` (1.0).
    solver_type: 'dpm_solver' (DiMR) or 'taylor'.
    lower_order_final: multistep only: with steps < 10 use orders min(order, steps + 1 - step) in
      the last steps, as later DPM-Solver releases do. DiMR's file predates the option, so the
      default False reproduces it ('fast' ends in lower orders by construction).
    denoise: if True, return the model's x0 prediction at ``t_end`` (one more evaluation). The
      official ``denoise_fn`` converts the x0 prediction as if it were eps when predict_x0=True;
      that is not reproduced. DiMR samples with denoise=False.
    schedule: the continuous schedule; default :func:`diffusion.vp_schedule` (SD betas).
  Returns:
    x at ``t_end``, float32, same shape as x_T.
  """
  _validate(steps, order, method, skip_type, solver_type, t_start, t_end)
  ns = schedule or diffusion.vp_schedule()
  x = jnp.asarray(x_T, jnp.float32)
  solver = _DPMSolverPP(eps_fn, ns, solver_type, x.shape[0])
  if method == "fast":
    grid = get_time_steps(skip_type, t_start, t_end, steps, ns)
    x = _sample_singlestep_plan(solver, x, grid, fast_orders(steps, order), fast=True)
  elif method == "singlestep":
    n_updates = steps // order
    grid = get_time_steps(skip_type, t_start, t_end, n_updates, ns)
    x = _sample_singlestep_plan(solver, x, grid, [order] * n_updates, fast=False)
  else:
    grid = get_time_steps(skip_type, t_start, t_end, steps, ns)
    x = _sample_multistep(solver, x, grid, steps, order, lower_order_final)
  if denoise:
    x = solver.data_pred(x, jnp.float32(t_end))
  return x


# ------------------------------------------------------------------------------------------------
# DDPM ancestral sampling (slow reference).
# ------------------------------------------------------------------------------------------------

def ddpm_sample(eps_fn: EpsFn, x_T: Array, key: Array,
                num_timesteps: int = diffusion.NUM_TIMESTEPS) -> Array:
  """Ancestral DDPM over all discrete steps n = N..1 with the posterior variance.

  ``x_{n-1} = (x_n - beta_n / sqrt(1 - abar_n) eps) / sqrt(alpha_n) + sqrt(beta~_n) z`` with
  ``beta~_n = beta_n (1 - abar_{n-1}) / (1 - abar_n)`` (zero at n = 1). The model sees the
  continuous time of step n, ``t = n/N`` (the VP schedule's knot), so ``eps_fn`` is shared with
  the ODE sampler. Coefficients come from the float64 tables, cast to float32. Returns x_0.
  """
  betas = np.append(0.0, diffusion.sd_betas(num_timesteps))
  one_minus_abar = diffusion.one_minus_alphas_cumprod(num_timesteps)
  n = np.arange(1, num_timesteps + 1)
  alpha = 1.0 - betas[n]

  def with_zero(v):  # tables indexed by n = 1..N; entry 0 is unused
    return np.append(0.0, v).astype(np.float32)

  coef_x = with_zero(1.0 / np.sqrt(alpha))
  coef_eps = with_zero(betas[n] / np.sqrt(one_minus_abar[n]) / np.sqrt(alpha))
  std = with_zero(np.sqrt(betas[n] * one_minus_abar[n - 1] / one_minus_abar[n]))
  # The continuous time of step n is the VP schedule's n-th knot, linspace(1/N, 1, N)[n - 1].
  t_cont = with_zero(diffusion.torch_linspace(1.0 / num_timesteps, 1.0, num_timesteps))
  coef_x, coef_eps, std, t_cont = map(jnp.asarray, (coef_x, coef_eps, std, t_cont))
  x = jnp.asarray(x_T, jnp.float32)
  batch = x.shape[0]

  def body(i, x):
    n = num_timesteps - i
    eps = eps_fn(x, jnp.full((batch,), t_cont[n])).astype(jnp.float32)
    z = jax.random.normal(jax.random.fold_in(key, n), x.shape, jnp.float32)
    return coef_x[n] * x - coef_eps[n] * eps + std[n] * z

  return jax.lax.fori_loop(0, num_timesteps, body, x)


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ------------------------------------------------------------------------------------------------

def _last_output(out: Any) -> Array:
  """DiMR returns [eps_lowres, ..., eps_full]; sampling uses the full-resolution one."""
  return out[-1] if isinstance(out, (list, tuple)) else out


def cfg_power_cosine_scale(t_continuous: Array, cfg_scale: float, cfg_scale_pow: float) -> Array:
  """eval.py's decayed guidance weight at continuous time t (float32, same op order).

  ``w(t) = (w - 1) * (1 - cos(((1 - t/1000) ** p) * pi)) * 1/2 + 1`` with the discrete
  ``t = t_cont * 1000``: about 1 at pure noise, w at t -> 0.
  """
  t = jnp.asarray(t_continuous, jnp.float32) * 1000.0
  decay = (1.0 - diffusion.true_divide(t, 1000.0)) ** cfg_scale_pow
  step = (1.0 - jnp.cos(decay * math.pi)) * 1 / 2
  return (cfg_scale - 1.0) * step + 1.0


def _check_guidance(cfg_scale: float, cfg_scale_pow: float | None,
                    cfg_interval: Sequence[float] | None) -> None:
  if not math.isfinite(cfg_scale):
    raise ValueError(f"guidance scale must be finite, got {cfg_scale}")
  if cfg_scale_pow is not None and cfg_scale_pow > 0:
    if not math.isfinite(cfg_scale_pow):
      raise ValueError(f"cfg_scale_pow must be finite, got {cfg_scale_pow}")
    if cfg_scale < 1.0:
      raise ValueError(f"the power-cosine schedule (cfg_scale_pow > 0) needs cfg_scale = w >= 1 "
                       f"(eps_u + w (eps_c - eps_u)), got {cfg_scale}")
  elif cfg_scale < 0.0:
    raise ValueError(f"the constant guidance scale s of eps_c + s (eps_c - eps_u) must be >= 0, "
                     f"got {cfg_scale}")
  if cfg_interval is not None and (
      len(cfg_interval) != 2 or not 0.0 <= cfg_interval[0] <= cfg_interval[1]):
    raise ValueError(f"cfg_interval must be (lo, hi) with 0 <= lo <= hi (continuous t), "
                     f"got {cfg_interval}")


def guided_eps_fn(apply_fn: Callable[[Array, Array, Array], Any], y: Array, *,
                  cfg_scale: float = 0.0, cfg_scale_pow: float | None = None,
                  cfg_interval: Sequence[float] | None = None, null_class: int = 1000,
                  num_timesteps: int = diffusion.NUM_TIMESTEPS,
                  shared_time: bool = False) -> EpsFn:
  """Builds ``eps_fn(x, t_continuous)`` for the solvers from a DiMR-style network.

  ``apply_fn(x, time_in, y)`` returns eps (or DiMR's list of eps, of which the last is used), with
  ``time_in = (t * 1000 / 1000) * 8 - 4`` as eval.py computes it.

  Guidance (cond and uncond run as ONE batched call of 2B; y_uncond = ``null_class``):
    * ``cfg_scale_pow`` None or <= 0: the official constant form ``eps_c + s (eps_c - eps_u)``
      with ``s = cfg_scale`` (0.4 in the released configs). s = 0 is plain conditional sampling
      (one B-sized call). The official eval.py also asserts s < 1, a guard against passing a w-style
      scale into the s-form; that cap is not kept: any s >= 0 is standard guidance with w = 1 + s.
    * ``cfg_scale_pow`` > 0: the power-cosine schedule ``eps_u + w(t) (eps_c - eps_u)``, with
      ``w = cfg_scale >= 1`` (:func:`cfg_power_cosine_scale`).
    * ``cfg_interval = (lo, hi)``: guidance only where the continuous t is in [lo, hi]; elsewhere
      the conditional eps. None (or (0, 1)) guides everywhere.

  ``shared_time=True`` promises that every image of a call sits at the same t (the solvers here
  always call so): the network then gets ``t[0]`` as one scalar time, which lets DiMR fold its
  time-dependent norm scales into GEMM weights (faster, same result to float rounding).
  """
  _check_guidance(cfg_scale, cfg_scale_pow, cfg_interval)
  power = cfg_scale_pow is not None and cfg_scale_pow > 0
  y = jnp.asarray(y)

  def time_in(t, copies=1):
    if shared_time:
      return diffusion.time_input_from_continuous(jnp.reshape(t, (-1,))[0], num_timesteps)
    t = jnp.concatenate([t] * copies) if copies > 1 else t
    return diffusion.time_input_from_continuous(t, num_timesteps)

  if (not power and cfg_scale == 0.0) or (power and cfg_scale == 1.0):
    def cond_eps_fn(x, t):
      return _last_output(apply_fn(x, time_in(t), y)).astype(jnp.float32)
    return cond_eps_fn

  def eps_fn(x, t):
    b = x.shape[0]
    y_uncond = jnp.full_like(y, null_class)
    out = _last_output(apply_fn(jnp.concatenate([x, x]), time_in(t, copies=2),
                                jnp.concatenate([y, y_uncond]))).astype(jnp.float32)
    eps_c, eps_u = out[:b], out[b:]
    if power:
      w = cfg_power_cosine_scale(t, cfg_scale, cfg_scale_pow)
      eps = eps_u + diffusion.expand_to(w, eps_c) * (eps_c - eps_u)
    else:
      eps = eps_c + cfg_scale * (eps_c - eps_u)
    if cfg_interval is not None:
      lo, hi = cfg_interval
      inside = (t >= lo) & (t <= hi)
      eps = jnp.where(diffusion.expand_to(inside, eps), eps, eps_c)
    return eps

  return eps_fn


# ------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Validated, hashable sampler config (a static argument of the jitted sampler)."""
  name: str = "dpm_solver"
  steps: int = 50
  order: int = 3
  method: str = "fast"
  skip_type: str = "time_uniform"
  t_end: float = 1e-3
  solver_type: str = "dpm_solver"
  cfg_scale: float = 0.0
  cfg_scale_pow: float | None = None
  cfg_interval: tuple[float, float] | None = None
  latent_shape: tuple[int, ...] = ()
  null_class: int = 1000

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.name!r}; expected one of {SAMPLERS}")
    if self.name == "dpm_solver":
      _validate(self.steps, self.order, self.method, self.skip_type, self.solver_type, 1.0,
                self.t_end)
    _check_guidance(self.cfg_scale, self.cfg_scale_pow, self.cfg_interval)
    if not self.latent_shape or any(int(d) < 1 for d in self.latent_shape):
      raise ValueError(f"latent_shape must be a non-empty (H, W, C), got {self.latent_shape}")


def _to_mapping(config: Any) -> dict:
  if config is None:
    return {}
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def sampler_settings(sampler_config: Any, model: Any = None) -> SamplerSettings:
  """Reads a sampler config (ConfigDict or dict); unknown keys are ignored (e.g. grid settings).

  ``latent_shape`` (H, W, C) and ``null_class`` default to what the model declares (DiMR's
  ``spec`` and ``num_classes - 1``), else must be given.
  """
  c = _to_mapping(sampler_config)
  fields = {f.name for f in dataclasses.fields(SamplerSettings)}
  kw = {k: v for k, v in c.items() if k in fields and v is not None}
  if "latent_shape" not in kw:
    spec = getattr(model, "spec", None)
    if spec and spec.get("stage_configs"):
      s = spec["stage_configs"][-1]
      ratio = s.get("input_feature_ratio", 1)
      kw["latent_shape"] = (s["max_height"] * ratio, s["max_width"] * ratio, spec["channels"])
  if "null_class" not in kw and getattr(model, "num_classes", None):
    kw["null_class"] = int(model.num_classes) - 1
  kw["latent_shape"] = tuple(int(d) for d in kw.get("latent_shape", ()))
  if kw.get("cfg_interval") is not None:
    kw["cfg_interval"] = tuple(float(v) for v in kw["cfg_interval"])
  for k in ("cfg_scale", "t_end"):
    if k in kw:
      kw[k] = float(kw[k])
  if kw.get("cfg_scale_pow") is not None:
    kw["cfg_scale_pow"] = float(kw["cfg_scale_pow"])
  return SamplerSettings(**kw)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def _sample_images_jit(graphdef, params, rest, labels, key, *, settings: SamplerSettings):
  def apply_fn(x, time_in, y):
    # A fresh module per call keeps the traced function pure (no state leaks out of lax loops).
    return nnx.merge(graphdef, params, rest)(x, time_in, y)

  eps_fn = guided_eps_fn(apply_fn, labels, cfg_scale=settings.cfg_scale,
                         cfg_scale_pow=settings.cfg_scale_pow, cfg_interval=settings.cfg_interval,
                         null_class=settings.null_class, shared_time=True)
  key_init, key_ddpm = jax.random.split(key)
  x_T = jax.random.normal(key_init, (labels.shape[0],) + settings.latent_shape, jnp.float32)
  if settings.name == "ddpm":
    return ddpm_sample(eps_fn, x_T, key_ddpm)
  return dpm_solver_sample(eps_fn, x_T, steps=settings.steps, order=settings.order,
                           method=settings.method, skip_type=settings.skip_type,
                           t_end=settings.t_end, solver_type=settings.solver_type)


def sample_images(model: nnx.Module, params: Any, labels: Array, key: Array,
                  sampler_config: Any) -> Array:
  """Samples NHWC latents (the model's space) for ``labels`` (B,), jitted end to end.

  Args:
    model: a DiMR-like ``nnx.Module``: ``model(x_nhwc, time_in, y) -> [eps_lowres, ..., eps_full]``;
      ``time_in`` comes as one scalar (every image of a solver step shares its time).
    params: an ``nnx.State`` of the model's ``nnx.Param`` s (e.g. EMA params), a full state, or a
      pure dict of them; None uses the model's own.
    labels: int class labels (B,). Sharding them over the batch shards the whole sample.
    key: PRNG key for x_T (and DDPM's noise).
    sampler_config: ``name`` ('dpm_solver' | 'ddpm'), ``steps``, ``order``, ``method``,
      ``skip_type``, ``t_end``, ``solver_type``, ``cfg_scale``, ``cfg_scale_pow``,
      ``cfg_interval``, ``latent_shape`` (H, W, C), ``null_class`` (see :func:`sampler_settings`).
  """
  settings = sampler_settings(sampler_config, model)
  graphdef, own_params, rest = nnx.split(model, nnx.Param, ...)
  params = own_params if params is None else _as_param_state(params, own_params)
  return _sample_images_jit(graphdef, params, rest, jnp.asarray(labels, jnp.int32), key,
                            settings=settings)


def _as_param_state(params: Any, template: nnx.State) -> nnx.State:
  """Accepts a Param state, a full state or a pure dict, returns a Param state like ``template``."""
  if isinstance(params, nnx.State):
    try:
      return nnx.filter_state(params, nnx.Param)
    except (TypeError, ValueError, AttributeError):  # leaves are plain arrays, not Variables
      params = nnx.to_pure_dict(params)
  state = jax.tree.map(lambda v: v, template)
  nnx.replace_by_pure_dict(state, params)
  return state
