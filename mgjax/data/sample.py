"""The bundled sample data: made by code, deterministic by seed, nothing downloaded.

Small enough to build in seconds and simple enough that a tiny model learns it in
minutes, yet written as real files in the real source formats (LLaVA/Mini-Gemini JSON,
LIMA jsonl, OpenAssistant trees), so it is read back through the same readers as real
data and exercises their rules (ranked alternatives, a deleted message, a non-English
tree, LIMA rows with an unanswered last turn).

  understanding: 128x128 PNGs with 1-3 shapes; questions with short checkable answers.
  generation:    "Please paint a pair of crimson discs against a jet-black backdrop as a
                 watercolour. <GEN>" -> "<h>Two red circles, on a plain black background,
                 watercolour painting.</h>": up to two groups of shapes (count, colour,
                 shape, a corner, left/right or above/below in either order), a background
                 and a style, each named in one of several wordings; the prompt says the
                 same in one canonical wording and order, so it must be composed, not copied.
  text:          arithmetic, spelling, counting and colour/shape facts, multi-turn.
  caption:       128x128 PNGs with a one-sentence description, asked for in one of
                 LLaVA's pretraining phrasings (the image before or after the request):
                 the pretraining phase's image-caption pairs.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

from etils import epath
from PIL import Image, ImageDraw

SIZE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20)
}
# A 3x3 grid of cells; a shape sits in the middle of its cell.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2)
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

Shape = tuple[str, str, str]  # (shape, colour, position)
_MAX_DRAWS = 1000  # redraws for a record unlike every earlier one

# ---------------------------------------------------------------------------------------
# Images and understanding conversations
# ---------------------------------------------------------------------------------------


def draw(scene: list[Shape]) -> bytes:
  """PNG bytes of the scene on a white background."""
  img = Image.new("RGB", (SIZE, SIZE), "white")
  d = ImageDraw.Draw(img)
  cell, r = SIZE / 3, SIZE / 3 * 0.35
  for shape, colour, pos in scene:
    gx, gy = POSITIONS[pos]
    cx, cy = (gx + 0.5) * cell, (gy + 0.5) * cell
    fill = COLOURS[colour]
    if shape == "circle":
      d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
      d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
      d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  buf = io.BytesIO()
  img.save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def _scene(rng: random.Random) -> list[Shape]:
  n = rng.randint(1, 3)
  positions = rng.sample(sorted(POSITIONS), n)
  return [(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), p) for p in positions]


def _phrase(shape: Shape) -> str:
  return f"a {shape[1]} {shape[0]}"


def _describe(scene: list[Shape]) -> str:
  parts = [f"{_phrase(s)} at the {s[2]}" if s[2] != "center" else f"{_phrase(s)} in the center" for s in scene]
  text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return text[0].upper() + text[1:] + "."


def _questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
  """All the (question, answer) pairs whose answer the scene decides unambiguously."""
  qa = [("How many shapes are there?", f"{NUMBERS[len(scene)].capitalize()}."),
        ("Describe the image.", _describe(scene))]
  by_shape = {s[0]: [x for x in scene if x[0] == s[0]] for s in scene}
  by_colour = {s[1]: [x for x in scene if x[1] == s[1]] for s in scene}
  if len(scene) == 1:
    shape, colour, pos = scene[0]
    qa += [("What shape is in the image?", f"A {shape}."), ("What colour is the shape?", f"{colour.capitalize()}."),
           ("Where is the shape?", f"{pos.capitalize()}.")]
  for shape, same in by_shape.items():
    if len(same) == 1:
      qa += [(f"What colour is the {shape}?", f"{same[0][1].capitalize()}."),
             (f"Where is the {shape}?", f"{same[0][2].capitalize()}.")]
    n = len(same)
    qa.append((f"How many {shape}s are there?", f"{NUMBERS[n].capitalize()}."))
  for colour, same in by_colour.items():
    if len(same) == 1:
      qa.append((f"What shape is {colour}?", f"The {colour} one is a {same[0][0]}."))
  present = {(s[0], s[1]) for s in scene}
  shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
  qa.append((f"Is there a {colour} {shape}?", "Yes." if (shape, colour) in present else "No."))
  return qa


def _understanding(n: int, rng: random.Random, images_dir: epath.Path) -> list[dict[str, Any]]:
  records, seen = [], set()
  for i in range(n):
    # Redrawn until new: the same picture asked the same first question is a duplicate
    # the builder would drop (and one could land in validation with its twin in train).
    for _ in range(_MAX_DRAWS):
      scene = _scene(rng)
      qa = _questions(scene, rng)
      turns = rng.sample(qa, k=min(len(qa), rng.choice((1, 1, 2, 3))))
      if (tuple(sorted(scene)), turns[0][0]) not in seen:
        break
    else:
      raise ValueError(f"sample: no new understanding conversation in {_MAX_DRAWS} draws; ask for fewer")
    seen.add((tuple(sorted(scene)), turns[0][0]))
    name = f"shapes_{i:05d}.png"
    (images_dir / name).write_bytes(draw(scene))
    conv = []
    for t, (q, a) in enumerate(turns):
      conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
      conv.append({"from": "gpt", "value": a})
    records.append({"id": f"shapes_{i:05d}", "image": name, "conversations": conv})
  return records


# Caption requests in the wording of LLaVA's pretraining data (blip_laion_cc_sbu_558k).
_CAPTION_REQUESTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                     "Give a short and clear explanation of the subsequent image.",
                     "Summarize the visual content of the image.",
                     "Share a concise interpretation of the image provided.",
                     "Render a clear and concise summary of the photo.")


def _captions(n: int, rng: random.Random, images_dir: epath.Path) -> list[dict[str, Any]]:
  """Image-caption pairs; about half put the image after the request, as LLaVA's data does."""
  records, seen = [], set()
  for i in range(n):
    for _ in range(_MAX_DRAWS):
      scene = _scene(rng)
      if tuple(sorted(scene)) not in seen:
        break
    else:
      raise ValueError(f"sample: no new caption scene in {_MAX_DRAWS} draws; ask for fewer")
    seen.add(tuple(sorted(scene)))
    name = f"caption_{i:05d}.png"
    (images_dir / name).write_bytes(draw(scene))
    request = rng.choice(_CAPTION_REQUESTS)
    question = f"<image>\n{request}" if rng.random() < 0.5 else f"{request}\n<image>"
    records.append({
        "id": f"caption_{i:05d}",
        "image": name,
        "conversations": [{
            "from": "human",
            "value": question
        }, {
            "from": "gpt",
            "value": _describe(scene)
        }]
    })
  return records


# ---------------------------------------------------------------------------------------
# Generation requests in the Mini-Gemini convention
# ---------------------------------------------------------------------------------------

# A request names what to draw in one of several wordings, in any order; the prompt says
# the same in one canonical wording and order. Getting every attribute right means
# composing the prompt (mapping "crimson" to red, "a pair of" to two, "B to the right of A"
# to "A on the left and B on the right", a style nobody named to the default), not copying.
_COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "navy", "azure"),
    "yellow": ("yellow", "lemon", "golden"),
    "purple": ("purple", "violet", "plum"),
    "orange": ("orange", "tangerine", "amber")
}
# (singular, plural) wordings per shape.
_SHAPE_WORDS = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round dot", "round dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("square tile", "square tiles")),
    "triangle": (("triangle", "triangles"), ("three-sided shape", "three-sided shapes"), ("wedge", "wedges"))
}
_COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a trio of"), 4: ("four",)}
# Prompt background -> how a request may ask for it; white is the default when none is asked.
_BACKGROUNDS = {
    "white": ("white", "snow-white"),
    "black": ("black", "jet-black"),
    "grey": ("grey", "gray"),
    "beige": ("beige", "sand-coloured"),
    "light blue": ("light blue", "sky-blue")
}
_BACKGROUND_FRAMES = ("on a {} background", "against a {} backdrop", "with a {} background")
# Prompt style -> how a request may ask for it; a vector illustration is the default.
_STYLES = {
    "simple vector illustration": ("as a flat vector illustration", "in clip-art style"),
    "watercolour painting": ("as a watercolour", "in watercolor"),
    "pencil sketch": ("as a pencil sketch", "drawn in graphite"),
    "pixel art": ("as pixel art", "in an 8-bit pixel style"),
    "3D render": ("as a 3D render", "rendered in CGI"),
    "oil painting": ("as an oil painting", "painted in oils")
}
_REQUESTS = ("Draw {what}.", "Create an image of {what}.", "Generate a picture showing {what}.", "Please paint {what}.",
             "Make a simple drawing with {what}.", "I would like to see {what}. Can you draw it?",
             "Could you show me {what}?")
_CORNERS = ("top left", "top right", "bottom left", "bottom right")


def _plural(shape: str, n: int) -> str:
  return shape if n == 1 else shape + "s"


def _generation(n: int, rng: random.Random) -> list[dict[str, Any]]:
  records, seen = [], set()
  for i in range(n):
    for _ in range(_MAX_DRAWS):
      request, prompt = _generation_request(rng)
      if request not in seen:
        break
    else:
      raise ValueError(f"sample: no new generation request in {_MAX_DRAWS} draws; ask for fewer")
    seen.add(request)
    records.append({
        "id": f"gen_{i:05d}",
        "conversations": [{
            "from": "human",
            "value": f"{request} <GEN>"
        }, {
            "from": "gpt",
            "value": f"<h>{prompt}.</h>"
        }]
    })
  return records


def _group(rng: random.Random, count: int | None = None) -> tuple[str, str]:
  """One group of like shapes: (the request's wording, the prompt's)."""
  shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
  k = count or rng.randint(1, 4)
  words = rng.choice(_SHAPE_WORDS[shape])[0 if k == 1 else 1]
  asked = f"{rng.choice(_COUNT_WORDS[k])} {rng.choice(_COLOUR_WORDS[colour])} {words}"
  return asked, f"{NUMBERS[k]} {colour} {_plural(shape, k)}"


def _generation_request(rng: random.Random) -> tuple[str, str]:
  """A request in one of many wordings and the prompt it should produce."""
  layout = rng.choice(("group", "group", "corner", "pair"))
  if layout == "group":  # one group of like shapes
    what, objects = _group(rng)
  elif layout == "corner":  # a single shape in a corner
    corner = rng.choice(_CORNERS)
    asked, shown = _group(rng, count=1)
    what = f"{asked} in the {rng.choice((corner, corner.replace(' ', '-')))} corner"
    objects = f"{shown} in the {corner} corner"
  else:  # two groups side by side or one above the other, named in either order
    (a_asked, a), (b_asked, b) = _group(rng, rng.randint(1, 2)), _group(rng, rng.randint(1, 2))
    if rng.random() < 0.5:
      what = rng.choice((f"{a_asked} to the left of {b_asked}", f"{b_asked} to the right of {a_asked}"))
      objects = f"{a} on the left and {b} on the right"
    else:
      what = rng.choice((f"{a_asked} above {b_asked}", f"{b_asked} below {a_asked}"))
      objects = f"{a} at the top and {b} at the bottom"
  background, style = "white", "simple vector illustration"
  extras = []
  if rng.random() < 0.7:
    background = rng.choice(sorted(_BACKGROUNDS))
    extras.append(rng.choice(_BACKGROUND_FRAMES).format(rng.choice(_BACKGROUNDS[background])))
  if rng.random() < 0.7:
    style = rng.choice(sorted(_STYLES))
    extras.append(rng.choice(_STYLES[style]))
  rng.shuffle(extras)
  what = " ".join([what] + extras)
  prompt = f"{objects[0].upper()}{objects[1:]}, on a plain {background} background, {style}"
  return rng.choice(_REQUESTS).format(what=what), prompt


# ---------------------------------------------------------------------------------------
# Text-only conversations
# ---------------------------------------------------------------------------------------

_WORDS = ("red", "green", "blue", "circle", "square", "triangle", "apple", "river", "window", "garden", "pencil",
          "yellow", "orange", "purple", "music", "planet", "rabbit", "candle", "forest", "bridge")
_SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
_MIXES = {
    ("blue", "yellow"): "green",
    ("red", "yellow"): "orange",
    ("red", "blue"): "purple",
    ("red", "white"): "pink",
    ("black", "white"): "grey"
}


def _text_dialogue(rng: random.Random) -> list[tuple[str, str]]:
  """A 1-3 exchange dialogue; follow-ups refer back to the previous answer."""
  topic = rng.choice(("arith", "arith", "spell", "count", "facts"))
  if topic == "arith":
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    turns = [(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")]
    total = a + b
    for _ in range(rng.randint(0, 2)):
      m = rng.randint(2, 3)
      turns.append((f"And what is that times {m}?", f"{total} x {m} = {total * m}."))
      total *= m
  elif topic == "spell":
    w = rng.choice(_WORDS)
    turns = [(f"How do you spell '{w}'?", "-".join(w).upper() + ".")]
    if rng.random() < 0.5:
      turns.append(("And backwards?", f"{w[::-1]}."))
    if rng.random() < 0.5:
      turns.append(("How many letters is that?", f"{len(w)} letters."))
  elif topic == "count":
    a = rng.randint(1, 15)
    b = a + rng.randint(2, 5)
    turns = [(f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + ".")]
    if rng.random() < 0.5:
      turns.append(("Now count back down.", ", ".join(str(i) for i in range(b, a - 1, -1)) + "."))
  else:
    turns = []
    # Distinct questions: asking the same thing twice in one dialogue teaches nothing more.
    for _ in range(rng.randint(1, 3)):
      if rng.random() < 0.5:
        shape = rng.choice(sorted(_SIDES))
        qa = (f"How many sides does a {shape} have?", f"A {shape} has {_SIDES[shape]} sides.")
      else:
        (c1, c2), c = rng.choice(sorted(_MIXES.items()))
        qa = (f"What colour do you get by mixing {c1} and {c2}?", f"Mixing {c1} and {c2} gives {c}.")
      if qa not in turns:
        turns.append(qa)
  return turns


def _wrong(answer: str, rng: random.Random) -> str:
  """A plausible worse answer for a ranked alternative reply."""
  return rng.choice(("I am not sure.", "I don't know, sorry.", f"Maybe {answer.lower()} Or not."))


def _new_dialogue(rng: random.Random, seen: set) -> list[tuple[str, str]]:
  """A dialogue no earlier LIMA row or OASST tree has (the builder drops duplicates
  across sources, and one could land in validation with its twin in train)."""
  for _ in range(_MAX_DRAWS):
    turns = _text_dialogue(rng)
    # The same questions in another order are near-duplicates too.
    if frozenset(turns) not in seen:
      seen.add(frozenset(turns))
      return turns
  raise ValueError(f"sample: no new text dialogue in {_MAX_DRAWS} draws; ask for fewer")


def _lima(n: int, rng: random.Random, seen: set) -> list[dict[str, Any]]:
  rows = []
  for i in range(n):
    conv = [t for qa in _new_dialogue(rng, seen) for t in qa]
    if i % 25 == 7:
      conv.append("Thanks! One more question?")  # unanswered: the reader must drop it
    rows.append({"conversations": conv, "source": "sample"})
  return rows


def _message(rng: random.Random, tree: str, role: str, text: str, rank: int | None = None, lang: str = "en",
             **extra) -> dict[str, Any]:
  msg = {
      "message_id": f"{tree}-{rng.getrandbits(48):012x}",
      "text": text,
      "role": role,
      "lang": lang,
      "review_count": 3,
      "review_result": True,
      "deleted": False,
      "synthetic": False,
      "replies": []
  }
  if rank is not None:
    msg["rank"] = rank
  msg.update(extra)
  return msg


def _oasst(n: int, rng: random.Random, seen: set) -> list[dict[str, Any]]:
  trees = []
  for i in range(n):
    tid = f"sample-tree-{i:05d}"
    turns = _new_dialogue(rng, seen)
    lang = "de" if i % 50 == 13 else "en"  # filtered out by the default lang="en"
    prompt = _message(rng, tid, "prompter", turns[0][0], lang=lang)
    parent = prompt
    for t, (q, a) in enumerate(turns):
      if t:
        follow = _message(rng, tid, "prompter", q, lang=lang, parent_id=parent["message_id"])
        parent["replies"].append(follow)
        parent = follow
      best = _message(rng, tid, "assistant", a, rank=0, lang=lang, parent_id=parent["message_id"])
      replies = [best]
      if rng.random() < 0.4:  # ranked alternatives: the reader must follow rank 0
        replies.append(
            _message(rng, tid, "assistant", _wrong(a, rng), rank=1, lang=lang, parent_id=parent["message_id"]))
      if i % 40 == 5 and t == 0:  # deleted, would-be-best reply: must not be followed
        replies.append(
            _message(rng, tid, "assistant", "[spam removed by moderators]", rank=0, lang=lang,
                     parent_id=parent["message_id"], deleted=True))
      if i % 40 == 25 and t == 0:  # failed review
        replies.append(
            _message(rng, tid, "assistant", "Whatever.", lang=lang, parent_id=parent["message_id"],
                     review_result=False))
      rng.shuffle(replies)  # file order must not decide
      parent["replies"].extend(replies)
      parent = best
    trees.append({"message_tree_id": tid, "tree_state": "ready_for_export", "prompt": prompt})
  return trees


# ---------------------------------------------------------------------------------------


def write_sample_sources(out_dir: str, seed: int = 0, n_understanding: int = 1500, n_generation: int = 1000,
                         n_text: int = 600, n_caption: int = 0) -> dict[str, str]:
  """Writes the sample source files under out_dir; returns {name: path}.

  The same seed and sizes always give byte-identical files. `n_text` is split evenly
  between the LIMA and OpenAssistant files (before the readers' filters).
  """
  out = epath.Path(out_dir)
  images = out / "images"
  for d in (images, out / "mgm", out / "lima", out / "oasst"):
    d.mkdir(parents=True, exist_ok=True)
  # One generator per file, so changing one size leaves the other files unchanged.
  rngs = {k: random.Random(f"{seed}/{k}") for k in ("understanding", "generation", "lima", "oasst", "caption")}
  paths = {
      "images": str(images),
      "understanding": str(out / "mgm/understanding.json"),
      "generation": str(out / "mgm/generation.json"),
      "lima": str(out / "lima/train.jsonl"),
      "oasst": str(out / "oasst/trees.jsonl"),
      "caption": str(out / "mgm/captions.json")
  }
  dump = lambda obj: json.dumps(obj, ensure_ascii=False)
  epath.Path(paths["understanding"]).write_text(dump(_understanding(n_understanding, rngs["understanding"], images)))
  epath.Path(paths["generation"]).write_text(dump(_generation(n_generation, rngs["generation"])))
  n_lima = n_text // 2
  dialogues = set()  # shared: no dialogue appears in both files
  epath.Path(paths["lima"]).write_text("".join(dump(r) + "\n" for r in _lima(n_lima, rngs["lima"], dialogues)))
  epath.Path(paths["oasst"]).write_text("".join(
      dump(t) + "\n" for t in _oasst(n_text - n_lima, rngs["oasst"], dialogues)))
  epath.Path(paths["caption"]).write_text(dump(_captions(n_caption, rngs["caption"], images)))
  return paths
