"""Prints a model summary computed from shapes only (nothing is allocated).

    python -m dimr_jax.tools.summary --config=configs/dimr_xl_256.py

Lines: ``params: <exact integer>``, ``gmacs: <number>`` (multiply-accumulates of one image's forward
pass, the paper's "GFLOPs" convention, attention included), then a per-stage breakdown.
"""
from __future__ import annotations

import argparse
import sys

from dimr_jax import config_utils
from dimr_jax.models import dimr as dimr_model


def count_macs(spec_or_config) -> dict:
  """Analytic MACs per image for one forward pass, by stage and component.

  Counts every matmul and conv (patch conv, qkv, attention QK^T and AV, projections, GEGLU, skip
  Linears, depthwise convs, upsample Linear, output conv). Norms, GELU, softmax and additions are
  not counted (the DiT / paper convention).
  """
  spec = dimr_model.model_spec_from_config(spec_or_config)
  ch = spec["channels"]
  stages, lowres = [], None
  for s in spec["stage_configs"]:
    d, hid = s["dim"], s["hidden_dim"]
    r = s["input_feature_ratio"]
    side_h = s["max_height"]
    side_w = s["max_width"]
    hw = side_h * side_w
    n = dimr_model.num_built_blocks(s["num_blocks"])
    c = {}
    c["patch"] = hw * ch * r * r * d
    if s["block_type"] == "TransformerBlock":
      t = hw + 1
      c["attention"] = n * (t * d * 3 * d + 2 * t * t * d + t * d * d)
      c["mlp"] = n * t * (2 * d * hid + hid * d)
      c["skip"] = (n // 2) * t * 2 * d * d
    else:
      k = s.get("kernel_size", 7)
      c["dwconv"] = n * hw * d * k * k
      c["mlp"] = n * hw * (2 * d * hid + hid * d)
      c["skip"] = (n // 2) * hw * 2 * d * d
    if lowres is not None:
      c_low, low_hw = lowres
      c["upsample"] = low_hw * c_low * d * (hw // low_hw)
    k = s.get("final_kernel_size", 3)
    c["head"] = hw * d * ch * k * k
    stages.append(c)
    lowres = (d * (n + 1), hw)
  total = sum(sum(c.values()) for c in stages)
  return {"total": total, "stages": stages}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="DiMR model summary from shapes")
  p.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
  args = p.parse_args(argv)
  config = config_utils.load_config_file(args.config)
  spec = dimr_model.model_spec_from_config(config.model)
  model = dimr_model.abstract_model(spec)
  params = dimr_model.count_params(model)
  macs = count_macs(spec)
  print(f"model: {config.model.get('variant', 'custom')}  image_size: {config.model.image_size}  "
        f"channels: {spec['channels']}  num_classes: {spec['num_classes']}  norm: {spec['norm_type']}")
  print(f"params: {params}")
  print(f"gmacs: {macs['total'] / 1e9:.2f}")
  for i, (s, c) in enumerate(zip(spec["stage_configs"], macs["stages"])):
    nb = dimr_model.num_built_blocks(s["num_blocks"])
    parts = "  ".join(f"{k}={v / 1e9:.2f}" for k, v in c.items())
    print(f"stage {i}: {s['block_type']} dim={s['dim']} blocks={nb} "
          f"tokens={s['max_height']}x{s['max_width']}  gmacs={sum(c.values()) / 1e9:.2f} ({parts})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
