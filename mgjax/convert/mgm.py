"""import-mgm: a whole Mini-Gemini from the files users download, as a trainer checkpoint.

  python -m mgjax.convert import-mgm --mgm_dir=models/MGM-7B \\
      --clip_dir=models/clip-vit-large-patch14-336 \\
      --convnext=models/openclip-convnext-large-d-320/open_clip_model.safetensors \\
      --config=configs/stage1.py:model=mgm_7b --out=runs/mgm7b
  python -m mgjax.main --config=configs/stage1.py:model=mgm_7b --config.init_from=runs/mgm7b ...

Every part comes from the first source that has it: the LLM from --mgm_dir or --llm_dir; the
CLIP/SigLIP tower from --mgm_dir (when MGM saved it) or --clip_dir; the ConvNeXt from
--mgm_dir or --convnext; mining and projector from --mgm_dir, else initialised as the trainer
would (training Mini-Gemini from its parts: --llm_dir, --clip_dir, --convnext). Parts with no
source are an error, except mining and projector.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from mgjax.convert import vision_weights


def import_mgm(argv: Sequence[str]) -> int:
  """import-mgm: see the module docstring."""
  parser = argparse.ArgumentParser(prog="python -m mgjax.convert import-mgm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mgm_dir", default="", help="a Mini-Gemini checkpoint folder (YanweiLi/MGM-*)")
  parser.add_argument("--llm_dir", default="", help="a Hugging Face LLM folder (when no --mgm_dir)")
  parser.add_argument("--clip_dir", default="", help="a CLIP/SigLIP folder or weights file")
  parser.add_argument("--convnext", default="", help="timm or OpenCLIP ConvNeXt weights (file or folder)")
  parser.add_argument("--out", required=True, help="folder to write (OUT/checkpoints/0)")
  parser.add_argument("--config", default="configs/stage1.py:model=mgm_7b",
                      help="the training config (FILE[:ARG]) whose model the checkpoint is for")
  parser.add_argument("--seed", type=int, default=0, help="initialises the parts not imported")
  parser.add_argument("--allow_pickle", action="store_true",
                      help="also read .bin/.pt/.pth checkpoints (unpickling can run code)")
  args = parser.parse_args(argv)
  if not (args.mgm_dir or args.llm_dir):
    parser.error("give --mgm_dir (a released Mini-Gemini) or --llm_dir (its LLM alone)")

  import jax
  import ml_collections
  import numpy as np
  from flax import nnx
  from mgjax import config_files
  from mgjax.convert import checkpoints, files, llm_weights
  from mgjax.models.vlm import MiniGemini
  path, _, arg = args.config.partition(":")
  config = config_files.load_config_file(path, arg or None)
  model_cfg = config.model.to_dict()
  llm_dir = args.mgm_dir or args.llm_dir
  _, hf_vocab = llm_weights.llm_config_from_hf(files.read_config(llm_dir))
  model_cfg["vocab_size"] = max(hf_vocab, int(model_cfg["vocab_size"]))
  llm_params, _, _, _ = llm_weights.import_hf_llm(llm_dir, allow_pickle=args.allow_pickle, llm=model_cfg["llm"],
                                                  pad_vocab_to=model_cfg["vocab_size"])
  mgm = files.load_tensors(args.mgm_dir, allow_pickle=args.allow_pickle) if args.mgm_dir else {}

  def source_for(marker: str, fallback: str, what: str, flag: str) -> tuple[dict, str]:
    if vision_weights.has_tensor_ending(mgm, marker):
      return mgm, args.mgm_dir
    if not fallback:
      raise vision_weights.CheckpointMismatch(
          f'no {what}: {args.mgm_dir or "(no --mgm_dir)"} does not hold it; give {flag}')
    return files.load_tensors(fallback, allow_pickle=args.allow_pickle), fallback

  imported = {"llm": os.path.abspath(llm_dir)}
  # Built eagerly on the host as the trainer initialises it; imported parts overwrite theirs.
  with jax.default_device(jax.devices("cpu")[0]), nnx.use_eager_sharding(False):
    model = MiniGemini(ml_collections.ConfigDict(model_cfg), rngs=nnx.Rngs(args.seed))
    tensors, src = source_for("embeddings.patch_embedding.weight", args.clip_dir, "low-res vision tower", "--clip_dir")
    vision_weights.load_vit(model.vision_lowres, tensors, source=src)
    imported["vision_lowres"] = os.path.abspath(src)
    tensors, src = source_for("stem.0.weight", args.convnext, "ConvNeXt tower", "--convnext")
    vision_weights.load_convnext(model.vision_highres, tensors, source=src)
    imported["vision_highres"] = os.path.abspath(src)
    if vision_weights.has_tensor_ending(mgm, "vlm_uni_query_projector.0.weight"):
      vision_weights.load_mining(model.mining, mgm, source=args.mgm_dir)
      vision_weights.load_projector(model.projector, mgm, source=args.mgm_dir)
      imported["mining"] = imported["projector"] = os.path.abspath(args.mgm_dir)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model)[1]))
  del model
  params = checkpoints.graft(params, "llm", llm_params)
  saved = config.to_dict()
  saved["model"] = model_cfg
  folder = checkpoints.write_init_checkpoint(args.out, params, saved, imported)
  for part, src in imported.items():
    print(f"{part:<15} from {src}")
  fresh = sorted({"mining", "projector"} - set(imported))
  if fresh:
    print(f'{", ".join(fresh)} initialised (seed {args.seed}), to be trained')
  print(f"wrote {folder}; train from it with --config.init_from={args.out}" +
        (f' --config.model.vocab_size={model_cfg["vocab_size"]}' if model_cfg["vocab_size"] !=
         config.model.vocab_size else ""))
  return 0
