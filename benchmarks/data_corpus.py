"""A synthetic instruction corpus for the data benchmarks: messages_jsonl records (with
generation requests among them, optionally images) and planted exact and near duplicates."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
from PIL import Image

_VOCAB = [
    f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ro", "sa", "ti", "vu", "ze")
    for b in ("bar", "cen", "dul", "fin", "gor", "han", "jis", "kel", "lum", "mor", "nap", "pil", "quo", "ras", "sut",
              "tov", "urn", "vex", "wal", "yod")
]


def conversation(rng: random.Random) -> list[dict[str, str]]:
  if rng.random() < 0.1:
    subject = " ".join(rng.choices(_VOCAB, k=6))
    return [{
        "role": "user",
        "content": f"Draw {subject}. <GEN>"
    }, {
        "role": "assistant",
        "content": f"<h>{subject}, {' '.join(rng.choices(_VOCAB, k=12))}</h>"
    }]
  turns = []
  for _ in range(rng.choice((1, 1, 2, 3))):
    turns.append({"role": "user", "content": " ".join(rng.choices(_VOCAB, k=rng.randint(5, 20))) + "?"})
    turns.append({"role": "assistant", "content": " ".join(rng.choices(_VOCAB, k=rng.randint(20, 120))) + "."})
  return turns


def records(n: int, seed: int = 0, exact_share: float = 0.05, near_share: float = 0.1):
  """n records; about exact_share are copies and near_share are edited copies (2 words
  changed) of an earlier record."""
  rng = random.Random(seed)
  made = []
  for i in range(n):
    r = rng.random()
    if made and r < exact_share:
      messages = [dict(m) for m in rng.choice(made[-5000:])]
    elif made and r < exact_share + near_share:
      messages = [dict(m) for m in rng.choice(made[-5000:])]
      answer = messages[-1]["content"].split(" ")
      editable = [i for i, w in enumerate(answer) if "<" not in w]  # keep <h>...</h> intact
      for pos in rng.sample(editable, min(2, len(editable))):
        answer[pos] = rng.choice(_VOCAB)
      messages[-1]["content"] = " ".join(answer)
    else:
      messages = conversation(rng)
    made.append(messages)
    yield {"id": f"r{i}", "messages": messages}


def write(path: str, n: int, seed: int = 0, image_every: int = 0, image_side: int = 96) -> int:
  """Writes the corpus as messages_jsonl; with `image_every`, every such record that is not
  a generation request gets its own random-noise PNG (beside the corpus, in images/),
  which does not compress. Returns the bytes of images written."""
  image_dir = os.path.join(os.path.dirname(path), "images")
  os.makedirs(image_dir, exist_ok=True)
  noise = np.random.default_rng(seed)
  image_bytes = 0
  with open(path, "w") as f:
    for i, row in enumerate(records(n, seed)):
      if image_every and i % image_every == 0 and "<GEN>" not in row["messages"][0]["content"]:
        buf = io.BytesIO()
        Image.fromarray(noise.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)).save(buf, "PNG")
        with open(os.path.join(image_dir, f"{i}.png"), "wb") as img:
          img.write(buf.getvalue())
        image_bytes += buf.tell()
        row["images"] = [f"{i}.png"]
        row["messages"] = [dict(m) for m in row["messages"]]  # later copies of it stay text only
        row["messages"][0]["content"] = "<image>\n" + row["messages"][0]["content"]
      f.write(json.dumps(row) + "\n")
  return image_bytes
