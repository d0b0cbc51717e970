"""notebooks/sample.ipynb runs green against a checkpoint that a tiny training run writes.

The notebook is executed with nbclient in a fresh kernel, the way CI (or papermill) would: its
``parameters`` cell is followed by an injected cell that points it at the test checkpoint and keeps
the grid small. The kernel runs on this interpreter (a kernelspec written into tmp_path, so no
registered ``python3`` kernel is needed) with ``JAX_PLATFORMS=cpu`` and *without* the 8-fake-device
``XLA_FLAGS`` of conftest: the notebook must work on a plain one-device machine.
"""
import json
import pathlib
import sys

import pytest

from dimr_jax import config_utils, train

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "sample.ipynb"
DIGITS = str(REPO / "configs" / "dimr_mu_digits.py")
KERNEL = "dimr-nbtest"


def _kernelspec(root: pathlib.Path) -> pathlib.Path:
  """A kernelspec for this very interpreter under ``root/kernels`` (put on JUPYTER_PATH)."""
  d = root / "kernels" / KERNEL
  d.mkdir(parents=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "dimr_jax test kernel", "language": "python",
          "env": {"JAX_PLATFORMS": "cpu",
                  "MPLBACKEND": "module://matplotlib_inline.backend_inline"}}
  (d / "kernel.json").write_text(json.dumps(spec))
  return root


def _inject_parameters(nb, params: dict) -> None:
  """papermill's convention: a cell tagged ``injected-parameters`` right after ``parameters``."""
  idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert idx, "the notebook needs a code cell tagged 'parameters'"
  src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(idx[0] + 1, cell)


def test_sample_notebook_runs_on_tiny_checkpoint(tmp_path, monkeypatch):
  from PIL import Image

  run = tmp_path / "run"
  cfg = config_utils.load_config_file(DIGITS + ":test", {
      "model.variant": "mu/2R", "async_checkpointing": False, "sample_every": 0,
      "total_steps": 2, "ckpt_every": 2, "log_every": 2})
  train.train_and_evaluate(cfg, str(run))

  # The kernel inherits this environment: drop the fake-device flag, keep everything on CPU.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  out_png = tmp_path / "grid.png"
  classes, per_class = [0, 3, 7], 2
  monkeypatch.setenv("DIMR_NB_CHECKPOINT", str(run))
  monkeypatch.setenv("DIMR_NB_OUT", str(out_png))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  _inject_parameters(nb, {"CLASSES": classes, "PER_CLASS": per_class, "STEPS": 3,
                          "CFG_SCALE": 1.0})
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()

  assert out_png.exists()
  with Image.open(out_png) as im:
    im.load()
    # 8x8 digits upscaled 8x to 64x64, 1 px padding: rows = classes, columns = samples per class.
    assert im.size == (per_class * 65 + 1, len(classes) * 65 + 1)
    assert im.mode == "L"
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no image/png output (plt.show)"
  assert not [o for o in outputs if o.get("output_type") == "error"]
