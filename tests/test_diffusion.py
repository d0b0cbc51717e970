"""Schedule, noising and multi-scale loss against the official fixtures (NCHW there, NHWC here)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimr_jax import diffusion


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def dpm_ref(fixtures_dir):
  return np.load(fixtures_dir / "dpm_solver_ref.npz")


@pytest.fixture(scope="module", params=["dimr_tiny_2r.npz", "dimr_tiny_2r_perturbed.npz"])
def loss_ref(request, fixtures_dir):
  d = np.load(fixtures_dir / request.param)
  return {k: d[k] for k in d.files if k.startswith("loss/")}


def test_betas_and_alpha_bar(dpm_ref, loss_ref):
  betas = diffusion.sd_betas()
  assert betas.dtype == np.float64 and betas.shape == (1000,)
  np.testing.assert_array_equal(betas, dpm_ref["schedule/betas_float64"])
  np.testing.assert_array_equal(betas.astype(np.float32), dpm_ref["schedule/betas_float32"])
  abar = diffusion.alphas_cumprod()
  assert abar.shape == (1001,) and abar[0] == 1.0  # index 0 = no noise, as the official Schedule
  n = loss_ref["loss/n"]
  np.testing.assert_allclose(abar[n], loss_ref["loss/cum_alpha_n"], rtol=1e-14, atol=0)
  np.testing.assert_allclose(diffusion.one_minus_alphas_cumprod()[n], loss_ref["loss/cum_beta_n"],
                             rtol=1e-12, atol=0)


def test_time_input(dpm_ref, loss_ref):
  np.testing.assert_array_equal(diffusion.time_input(jnp.asarray(dpm_ref["mapping/train_n"])),
                                dpm_ref["mapping/train_log_snr"])
  np.testing.assert_array_equal(jax.jit(diffusion.time_input)(jnp.asarray(loss_ref["loss/n"])),
                                loss_ref["loss/log_snr"])
  # The sampler's continuous mapping t*1000/1000*8 - 4 (eval.py's op order).
  got = jax.jit(diffusion.time_input_from_continuous)(jnp.asarray(dpm_ref["mapping/t_continuous"]))
  np.testing.assert_array_equal(got, dpm_ref["mapping/log_snr"])


def test_sample_timesteps_range():
  n = np.asarray(diffusion.sample_timesteps(jax.random.PRNGKey(0), 20000))
  assert n.min() == 1 and n.max() == 1000
  assert abs(n.mean() - 500.5) < 10


def test_vp_schedule_matches_official(dpm_ref):
  ns = diffusion.vp_schedule()
  np.testing.assert_array_equal(ns.t_discrete, dpm_ref["schedule/t_discrete"])
  np.testing.assert_allclose(ns.log_alpha_discrete, dpm_ref["schedule/log_alpha_discrete"],
                             atol=2e-7, rtol=0)
  @jax.jit
  def probe_fns(t):
    return dict(marginal_log_mean_coeff=ns.marginal_log_mean_coeff(t),
                marginal_alpha=ns.marginal_alpha(t), marginal_std=ns.marginal_std(t),
                marginal_lambda=ns.marginal_lambda(t),
                inverse_lambda_of_marginal_lambda=ns.inverse_lambda(ns.marginal_lambda(t)))

  # Tolerances as the fixture advises (lambda near t = 1e-3 has ~2e-5 float32 sensitivity).
  atol = dict(marginal_log_mean_coeff=1e-6, marginal_alpha=1e-6, marginal_std=1e-6,
              marginal_lambda=5e-5, inverse_lambda_of_marginal_lambda=1e-6)
  for probe in ("t", "t_extra"):  # t_extra includes t < 1e-3 (linear extrapolation)
    got = probe_fns(jnp.asarray(dpm_ref[f"schedule/{probe}"]))
    for name, value in got.items():
      np.testing.assert_allclose(value, dpm_ref[f"schedule/{probe}/{name}"], atol=atol[name],
                                 rtol=0, err_msg=f"{probe}/{name}")
  for probe in ("lambda_grid", "lambda_out_of_range"):  # out of range: t > 1 and t < 1e-3
    lam = jnp.asarray(dpm_ref[f"schedule/{probe}"])
    np.testing.assert_allclose(jax.jit(ns.inverse_lambda)(lam),
                               dpm_ref[f"schedule/{probe}/inverse_lambda"], atol=1e-6)


def test_vp_schedule_agrees_with_discrete_at_knots():
  """t = n/1000 is discrete step n: alpha_t^2 == alpha_bar_n (float32 tables vs float64)."""
  ns = diffusion.vp_schedule()
  n = np.array([1, 10, 437, 999, 1000])
  alpha2 = np.exp(2 * np.asarray(ns.marginal_log_mean_coeff(jnp.asarray(ns.t_discrete[n - 1]))))
  np.testing.assert_allclose(alpha2, diffusion.alphas_cumprod()[n], rtol=2e-6)


def test_q_sample_and_targets_match_fixture(loss_ref):
  x0, noise = _nhwc(loss_ref["loss/x0"]), _nhwc(loss_ref["loss/noise"])
  n = jnp.asarray(loss_ref["loss/n"])
  xt = jax.jit(diffusion.q_sample)(jnp.asarray(x0), n, jnp.asarray(noise))
  np.testing.assert_allclose(xt, _nhwc(loss_ref["loss/xt"]), atol=1e-6, rtol=0)
  t8, t16 = diffusion.multiscale_targets(jnp.asarray(noise), [8, 16])
  np.testing.assert_allclose(t8, _nhwc(loss_ref["loss/target_8"]), atol=1e-6, rtol=0)
  np.testing.assert_allclose(t16, _nhwc(loss_ref["loss/target_16"]), atol=1e-6, rtol=0)


def test_multiscale_loss_matches_fixture(loss_ref):
  preds = [jnp.asarray(_nhwc(loss_ref[f"loss/pred_{w}"])) for w in (8, 16)]
  noise = jnp.asarray(_nhwc(loss_ref["loss/noise"]))
  np.testing.assert_array_equal(loss_ref["loss/coeffs"], diffusion.default_loss_coeffs(2))
  mean, per_sample, per_res = jax.jit(diffusion.multiscale_loss)(preds, noise)
  np.testing.assert_allclose(per_sample, loss_ref["loss/per_sample"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(mean, loss_ref["loss/mean"], atol=1e-6, rtol=0)
  # Per-resolution entries are the unweighted batch-mean MSEs.
  targets = diffusion.multiscale_targets(noise, [8, 16])
  for p, t, got in zip(preds, targets, per_res):
    np.testing.assert_allclose(got, np.mean((np.asarray(p) - np.asarray(t)) ** 2), rtol=1e-6)
  np.testing.assert_allclose(0.25 * per_res[0] + per_res[1], mean, rtol=1e-6)


def test_targets_keep_unit_variance_and_three_levels():
  noise = jax.random.normal(jax.random.PRNGKey(1), (8, 64, 64, 4))
  targets = diffusion.multiscale_targets(noise, [16, 32, 64])
  assert [t.shape for t in targets] == [(8, 16, 16, 4), (8, 32, 32, 4), (8, 64, 64, 4)]
  for t in targets:
    assert abs(float(jnp.std(t)) - 1.0) < 0.03
  np.testing.assert_allclose(targets[0][0, 0, 0, 0], noise[0, :4, :4, 0].sum() / 4, rtol=1e-5)
  assert diffusion.default_loss_coeffs(3) == [1 / 16, 1 / 4, 1.0]
  with pytest.raises(ValueError, match="coefficients"):
    diffusion.multiscale_loss(targets, noise, coeffs=[1.0, 1.0])
  with pytest.raises(ValueError, match="divide"):
    diffusion.multiscale_targets(noise, [24])


def test_label_dropout():
  y = jnp.arange(10000) % 1000
  out = np.asarray(diffusion.label_dropout(jax.random.PRNGKey(0), y, 0.1, 1000))
  dropped = out == 1000
  assert abs(dropped.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(out[~dropped], np.asarray(y)[~dropped])
  np.testing.assert_array_equal(diffusion.label_dropout(jax.random.PRNGKey(0), y, 0.0, 1000), y)


def test_diffusion_loss_end_to_end():
  """The convenience loss wires n, noise, q_sample, time input and dropout consistently."""
  b, key = 4, jax.random.PRNGKey(3)
  x0 = jax.random.normal(jax.random.PRNGKey(4), (b, 8, 8, 4))
  y = jnp.arange(b)
  seen = {}

  def apply_fn(x_t, time_in, y_in):
    seen.update(x_t=x_t, time_in=time_in, y=y_in)
    return [jnp.zeros((b, 4, 4, 4)), jnp.zeros((b, 8, 8, 4))]

  loss, aux = diffusion.diffusion_loss(apply_fn, x0, y, key, p_uncond=0.0, null_class=1000)
  k_n, k_eps, _ = jax.random.split(key, 3)
  n = diffusion.sample_timesteps(k_n, b)
  noise = jax.random.normal(k_eps, x0.shape)
  np.testing.assert_array_equal(aux["n"], n)
  np.testing.assert_allclose(seen["x_t"], diffusion.q_sample(x0, n, noise), atol=1e-6)
  np.testing.assert_array_equal(seen["time_in"], diffusion.time_input(n))
  np.testing.assert_array_equal(seen["y"], y)
  # Zero predictions: loss = 1/4 * E[T_4^2] + E[eps^2].
  t16 = diffusion.multiscale_targets(noise, [4])[0]
  np.testing.assert_allclose(aux["loss_4"], jnp.mean(t16 ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["loss_8"], jnp.mean(noise ** 2), rtol=1e-5)
  np.testing.assert_allclose(loss, 0.25 * aux["loss_4"] + aux["loss_8"], rtol=1e-5)
  assert aux["per_sample"].shape == (b,)
