"""What the Pallas (Triton) kernels of dimr_jax/models/*_kernel.py share.

The Triton backend of Pallas is deprecated in jax 0.11 and may be gone from later releases, so
its import is guarded: ``pltriton`` is None without it and ``available()`` says so (the model then
keeps every op on XLA).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Pallas Triton backend is deprecated in jax 0.11 and may be gone in later releases
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
  pltriton = None

Array = jax.Array


def available() -> bool:
  return pltriton is not None


def interpret_default() -> bool:
  """Pallas' interpret mode where there is no GPU to compile for (how the CPU tests run)."""
  return jax.default_backend() == "cpu"


def pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two <= cap dividing n (1 if n is odd): Triton blocks are powers of two."""
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def compiler_params(num_warps: int, num_stages: int = 1):
  """Triton launch parameters. Passing them is also what selects the Triton backend (jax >= 0.10
  defaults pallas_call on GPU to Mosaic GPU); the class was TritonCompilerParams in older jax."""
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def dot(a: Array, b: Array) -> Array:
  """A block matmul with float32 accumulation (tensor cores); lives in pallas.triton since jax 0.10."""
  f = getattr(pltriton, "dot", None) or pl.dot
  return f(a, b)


def block_mask(extent: int, block: int, shape: tuple[int, ...], dim: int,
               grid_axis: int) -> Array | None:
  """``shape`` mask of the elements whose index along ``dim`` exists, in this program's block
  (number ``program_id(grid_axis)``, ``block`` wide) of an axis ``extent`` long; None when
  ``block`` divides ``extent`` (no mask needed).

  Pallas' Triton lowering does not mask a block that runs past the array's end, so the last block
  must mask its loads and stores itself.
  """
  if extent % block == 0:
    return None
  i = pl.program_id(grid_axis) * block + lax.broadcasted_iota(jnp.int32, shape, dim)
  return i < extent


def row_mask(rows: int, bm: int, width: int) -> Array | None:
  """(bm, width) mask of the rows of this program's row block (grid axis 1) that exist, or None
  when bm divides ``rows``: :func:`block_mask` along dim 0."""
  return block_mask(rows, bm, (bm, width), 0, 1)


def load(ref, mask: Array | None) -> Array:
  """ref[...], masked (zeros outside) when a mask is given: Pallas' Triton lowering does not mask
  blocks that run past an array's end, so partial blocks mask themselves."""
  if mask is None:
    return ref[...]
  return pltriton.load(ref, mask=mask, other=0)


def store(ref, val: Array, mask: Array | None) -> None:
  if mask is None:
    ref[...] = val
  else:
    pltriton.store(ref, val, mask=mask)
