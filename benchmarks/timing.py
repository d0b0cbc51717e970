"""The one timing loop of the benchmark scripts: synchronised wall-clock time per call."""
import statistics
import time

import jax


def step_times(f, *args, steps: int = 20, warmup: int = 1) -> list[float]:
  """Seconds of ``steps`` calls of ``f(*args)``, each waited for, after ``warmup`` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return times


def median_ms(f, *args, steps: int = 20, warmup: int = 1) -> float:
  return 1e3 * statistics.median(step_times(f, *args, steps=steps, warmup=warmup))
