"""The one record shape that crosses from dataset building into training.

Every reader turns its source format into `Record`s; anything it cannot turn into a
valid record becomes a `Rejection` that names the file, the record and the reason,
so the builder can report it and carry on with the rest.
"""

from __future__ import annotations

import dataclasses

# caption: image-caption pairs for the pretraining (alignment) phase. Never inferred: a
# source names it (category="caption" in the data config); such records get their own
# splits, train_caption and val_caption, and stay out of the instruction mix.
CATEGORIES = ("text", "understanding", "generation", "caption")
# The splits of every build (an empty one holds no records).
SPLITS = ("train", "train_generation", "val_understanding", "val_generation", "val_text", "train_caption",
          "val_caption")
ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
# Mini-Gemini's generation convention: the user turn ends with " <GEN>" and the answer
# carries a text-to-image prompt between <h> and </h> (plain text, not special tokens).
GEN_MARKER = "<GEN>"
PROMPT_OPEN, PROMPT_CLOSE = "<h>", "</h>"


@dataclasses.dataclass
class Record:
  id: str
  source: str
  category: str  # one of CATEGORIES
  messages: list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
  # Encoded JPEG/PNG bytes; a reader asked for `lazy_images` leaves checked paths here
  # until `sources.load_images` reads them.
  images: list[bytes] = dataclasses.field(default_factory=list)
  # Where the record came from ("path: line 12"), so a later stage that drops it can say so.
  origin: str = dataclasses.field(default="", compare=False)

  def to_example(self) -> dict:
    """The dict a TFDS builder yields for this record."""
    return {
        "id": self.id,
        "source": self.source,
        "category": self.category,
        "messages": [{
            "role": m["role"],
            "content": m["content"]
        } for m in self.messages],
        "images": list(self.images),
    }


@dataclasses.dataclass
class Rejection:
  source: str
  file: str
  record: str  # where in the file: "line 12", "record 3 (id=abc)", ...
  reason: str  # what is wrong and, where it helps, how to fix it
  # A short stable name for the reason ("invalid_json", "missing_image", ...): the data
  # card counts rejections by it, since `reason` carries record-specific detail.
  kind: str = "invalid"
  duplicate_of: str | None = None  # for duplicates: the id of the record that was kept
  id: str | None = None  # the record's id, where it got as far as having one
  # Its normalised turns, for the review page (mgjax.data.review); the build keeps them for
  # a seeded sample of each source's rejections of each kind (see mgjax.data.verdicts).
  messages: list[dict[str, str]] | None = None

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    return f"{self.file}: {self.record}: {self.reason} [source {self.source}]"


def infer_category(messages: list[dict[str, str]], num_images: int) -> str:
  """generation if a user turn asks with <GEN>; understanding if it has images; else text."""
  if any(m["role"] == "user" and m["content"].rstrip().endswith(GEN_MARKER) for m in messages):
    return "generation"
  return "understanding" if num_images else "text"


def check(record: Record) -> str | None:
  """Returns why a record cannot be trained on, or None when it is fine."""
  if not record.messages:
    return "empty conversation: no turns"
  for i, m in enumerate(record.messages):
    if m.get("role") not in ROLES:
      return f"turn {i}: unknown role {m.get('role')!r} (expected one of {ROLES})"
    if not isinstance(m.get("content"), str) or not m["content"].strip():
      return f"turn {i}: empty {m.get('role')} turn"
  if not any(m["role"] == "assistant" for m in record.messages):
    return "no assistant turn: nothing to learn from"
  # Templates and loss masks assume [system] user assistant user assistant ...: a
  # conversation out of that order would be trained on a prompt it was never given.
  turns = record.messages[1:] if record.messages[0]["role"] == "system" else record.messages
  for i, m in enumerate(turns):
    expected = "user" if i % 2 == 0 else "assistant"
    if m["role"] != expected:
      return (f"broken alternation: turn {i + len(record.messages) - len(turns)} is {m['role']}, expected "
              f"{expected} (turns must go [system] user assistant user ...)")
  if turns[-1]["role"] != "assistant":
    return "broken alternation: the last turn is an unanswered user turn"
  slots = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in record.messages)
  if slots != len(record.images):
    return f"{slots} {IMAGE_PLACEHOLDER} placeholders but {len(record.images)} images"
  if record.category not in CATEGORIES:
    return f"unknown category {record.category!r} (expected one of {CATEGORIES})"
  return None
