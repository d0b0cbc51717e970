"""Loading ml_collections config files outside absl flags (tools, notebooks, tests)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads ``configs/x.py`` or ``configs/x.py:arg`` (calls ``get_config(arg)``), then applies overrides.

  Overrides are ``{'optim.lr': 1e-4}``; an unknown key raises KeyError naming it (configs are locked).
  """
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  name = "dimr_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  config = ml_collections.ConfigDict(config) if not isinstance(config, ml_collections.ConfigDict) else config
  config.lock()
  for key, value in (overrides or {}).items():
    set_by_path(config, key, value)
  return config


def set_by_path(config: ml_collections.ConfigDict, key: str, value) -> None:
  node = config
  parts = key.split(".")
  for p in parts[:-1]:
    if p not in node:
      raise KeyError(f"unknown config key {key!r} ({p!r} does not exist)")
    node = node[p]
  if parts[-1] not in node:
    raise KeyError(f"unknown config key {key!r}")
  node[parts[-1]] = value


def config_from_json(text_or_path: str) -> ml_collections.ConfigDict:
  """Rebuilds a ConfigDict from the ``config.json`` a run writes (the notebook uses this)."""
  if os.path.exists(text_or_path):
    with open(text_or_path) as f:
      text_or_path = f.read()
  return ml_collections.ConfigDict(json.loads(text_or_path))
