"""Mini-Gemini 2B HD (MGM-2B-HD): mgm_2b with a 2x2 grid of 336 px crops plus the
global view for CLIP and the ConvNeXt at 1536 px (mgjax.presets.hd_variant), as
YanweiLi/MGM-2B-HD was trained.

Select with --config=configs/stage1.py:model=mgm_2b_hd.
"""

from mgjax import config_files, presets


def get_config(arg: str | None = None):
  del arg  # one preset; the argument keeps the big_vision get_config(arg) signature
  return presets.hd_variant(config_files.preset("models", "mgm_2b"))
