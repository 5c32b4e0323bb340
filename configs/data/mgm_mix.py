"""Mini-Gemini's instruction mix from the files its publishers ship, under their own names.

  python -m mgjax.data.build --config=configs/data/mgm_mix.py --data_dir=DIR \
      --config.sources_root=/path/to/downloads

Expected under sources_root (download them first; nothing is fetched by the builder):

  MiniGemini-Finetune/minigemini_instruction.json   YanweiLi/Mini-Gemini-Instruction (1.79 GB JSON)
  MiniGemini-Finetune/{coco,gqa,ocr_vqa,textvqa,vg,gpt4v-dataset,sam,share_textvqa,wikiart,
                       web-celebrity,web-landmark,ALLaVA-4V,docvqa,chartqa,dvqa,ai2d}/   its images
  lima/train.jsonl                                   GAIR/lima
  oasst2/2023-11-05_oasst2_ready.trees.jsonl.gz      OpenAssistant/oasst2 (tree export)

minigemini_instruction.json already holds the generation samples (its generation-only
subset, minigemini_generation_pure_text.json, must not be added again) and text-only
conversations. LIMA and OpenAssistant come first, so where the Mini-Gemini file repeats
their conversations the copy there is the one counted as a duplicate, and the card
shows how many.

The mix follows the recipe: all understanding conversations, about 6K text and 13K
generation samples (`mixture.counts`); the card states the up- or down-sampling each took.
Presets: `:gen_weighted` mixes by weights instead (text 1 : generation 2 of the text and
generation records available).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "mgm_mix"
  c.version = "1.0.0"  # bump when sources, filters or the mix change
  c.seed = 0
  c.sources_root = "."  # relative source paths resolve here (set on the command line)
  c.num_workers = 0  # 0: one worker process per core
  c.val_per_category = ml_collections.ConfigDict(dict(understanding=1000, generation=500, text=500))
  # A source keeping less than this share of its records stops the build (a wrong image_root
  # rejects every image record); a source's own `min_kept_share` overrides it, 0 turns it off.
  c.min_kept_share = 0.5

  finetune = "MiniGemini-Finetune"
  c.sources = [
      dict(name="lima", format="lima", path="lima/train.jsonl"),
      # Under half of the export's trees have an English root prompt: the others are rejected
      # as `language` on purpose, so this source may keep less than the recipe's share.
      dict(name="oasst2", format="oasst_trees", path="oasst2/2023-11-05_oasst2_ready.trees.jsonl.gz",
           options=dict(lang="en", threads="best", drop_synthetic=True), min_kept_share=0.2),
      # Category inferred per record: generation (user turn ends with " <GEN>"),
      # understanding (has an image), else text.
      dict(name="minigemini_instruction", format="llava_json", path=f"{finetune}/minigemini_instruction.json",
           image_root=finetune),
  ]

  # Lengths in tokens of the LLM's tokenizer: a saved Hugging Face tokenizer folder
  # (e.g. google/gemma-2b-it downloaded with `huggingface-cli download`).
  c.tokenizer = ml_collections.ConfigDict(dict(train=False, vocab_size=0, path="model_zoo/LLM/gemma/gemma-2b-it"))
  c.filters = ml_collections.ConfigDict(
      dict(languages=["en"], min_turn_tokens=1, max_turn_tokens=4096, max_conversation_tokens=8192,
           max_repeated_fraction=0.5))
  c.dedup = ml_collections.ConfigDict(dict(exact=True, near=True, threshold=0.8, num_perm=128))
  c.mixture = ml_collections.ConfigDict(dict(by="category", counts=dict(text=6000, generation=13000)))

  # A review.jsonl of a person's verdicts ({"id", "source", "verdict": "keep"|"drop", "note"} a line),
  # exported by `python -m mgjax.data.review`; the build drops and keeps those records. "" for none.
  c.review = ""

  if arg == "gen_weighted":
    c.name = "mgm_mix_gen_weighted"
    c.mixture = ml_collections.ConfigDict(dict(by="category", weights=dict(text=1, generation=2)))
  elif arg:
    raise ValueError(f"configs/data/mgm_mix.py: unknown preset {arg!r} (known: gen_weighted)")
  return c
