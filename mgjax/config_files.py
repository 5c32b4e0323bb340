"""Finding and loading config files: configs/ of a checkout or an installed package, and presets.

Config files under configs/ are Python files with `get_config(arg)` (big_vision style):
`--config=configs/stage1.py:model=sample` passes "model=sample" as `arg`. Configs come
back locked, so a misspelt override (`--config.train.stpes=5`) is an error instead of a
silently ignored key.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import ml_collections


def _configs_dir() -> str:
  """configs/ beside the package in a checkout (or an editable install), else the copy an
  installed package ships in PREFIX/share/mgjax/configs (setup.cfg's data_files), found from the
  package's own place (PREFIX/lib/pythonX.Y/site-packages/mgjax) so venvs, --user and --prefix
  installs all work."""
  package = pathlib.Path(__file__).resolve().parent
  checkout = package.parent / "configs"
  if (checkout / "stage1.py").exists():
    return str(checkout)
  for prefix in (*package.parents[3:4], pathlib.Path(sys.prefix)):  # parents[3]: PREFIX
    shipped = prefix / "share" / "mgjax" / "configs"
    if (shipped / "stage1.py").exists():
      return str(shipped)
  return str(checkout)  # nowhere: the error names the path a checkout would have


CONFIGS_DIR = _configs_dir()


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
  """Parses "key=value,key=value" from `--config=FILE:ARG` over the given defaults."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in values:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(values)}")
    values[key] = value
  return ml_collections.ConfigDict(values)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file by path and calls its get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f"_mgjax_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def preset(kind: str, name: str) -> ml_collections.ConfigDict:
  """Loads configs/<kind>/<name>.py, e.g. preset("models", "sample") or preset("data", "sample:tiny").

  A name ending in .py is a config file of your own, anywhere on disk (relative to the
  working directory), e.g. `--config=configs/stage1.py:data=/path/my_mix.py`.
  """
  name, _, arg = name.partition(":")
  if name.endswith(".py"):
    if not os.path.exists(name):
      raise ValueError(f"{kind} config file {os.path.abspath(name)} does not exist")
    return load_config_file(name, arg or None)
  path = os.path.join(CONFIGS_DIR, kind, f"{name}.py")
  if not os.path.exists(path):
    available = sorted(f[:-3] for f in os.listdir(os.path.join(CONFIGS_DIR, kind)) if f.endswith(".py"))
    raise ValueError(f"no {kind} preset {name!r}: {path} does not exist; available: {available}")
  return load_config_file(path, arg or None)
