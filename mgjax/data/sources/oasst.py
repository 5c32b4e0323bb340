"""OpenAssistant message-tree export: one tree a line, `{"message_tree_id", "prompt": {...,
"replies": [...]}}`, every message with `role` (prompter/assistant), `text`, `lang`, `rank`,
`deleted`, `review_result`, `synthetic`.

Common practice (and ours) makes one thread per tree by following the best-ranked reply
at each step. Deleted messages and those that failed review are removed with their
subtrees before choosing, so a deleted rank-0 reply hands its place to the next best.
"""

from __future__ import annotations

from typing import Any, Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common

_ROLES = {"prompter": "user", "assistant": "assistant"}


def _usable(msg: dict[str, Any], drop_synthetic: bool) -> bool:
  if msg.get("deleted") or msg.get("review_result") is False:
    return False
  return not (drop_synthetic and msg.get("synthetic"))


def _best(replies: list[dict[str, Any]]) -> dict[str, Any]:
  # rank 0 is best; a reply nobody ranked (rank None, e.g. an only child) counts as
  # worse than any ranked one; ties keep file order.
  order = lambda im: (im[1].get("rank") is None, im[1].get("rank") or 0, im[0])
  return min(enumerate(replies), key=order)[1]


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         lang: str | list[str] | None = "en", drop_synthetic: bool = False,
         **options) -> Iterator[Record | Rejection]:
  """Yields one Record (the best-ranked thread) per tree, or a Rejection saying why not.

  Args:
    lang: keep trees whose root prompt has this language (or one of these); None keeps all.
    drop_synthetic: also drop messages marked `synthetic` (the bundled real test file is
      all synthetic-flagged at the root of some trees, so the default keeps them).
  """
  del image_root  # OpenAssistant is text only.
  if options:
    raise ValueError(f"oasst_trees reader: unknown options {sorted(options)}")
  langs = None if lang is None else ({lang} if isinstance(lang, str) else set(lang))
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, tree = item
    prompt = tree.get("prompt") if isinstance(tree, dict) else None
    tree_id = tree.get("message_tree_id") if isinstance(tree, dict) else None
    where = f"line {lineno} (tree {tree_id})"
    if not isinstance(prompt, dict):
      yield Rejection(source, str(path), where, 'expected {"message_tree_id", "prompt": {...}}',
                      kind="bad_schema")
      continue
    if langs is not None and prompt.get("lang") not in langs:
      yield Rejection(source, str(path), where,
                      f"root prompt language {prompt.get('lang')!r} not in {sorted(langs)}",
                      kind="language")
      continue
    if not _usable(prompt, drop_synthetic):
      yield Rejection(source, str(path), where, "root prompt is deleted, failed review or synthetic",
                      kind="dropped_message")
      continue
    messages, msg = [], prompt
    while True:
      role = _ROLES.get(msg.get("role"))
      text = msg.get("text")
      if role is None or not isinstance(text, str):
        messages = None
        break
      messages.append({"role": role, "content": text})
      replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and _usable(r, drop_synthetic)]
      if not replies:
        break
      msg = _best(replies)
    if messages is None:
      yield Rejection(source, str(path), where,
                      f"message {msg.get('message_id')}: role must be prompter|assistant and text a string",
                      kind="bad_schema")
      continue
    if messages and messages[-1]["role"] == "user":
      messages.pop()  # unanswered last prompt
    if not messages:
      yield Rejection(source, str(path), where,
                      "no assistant reply left after dropping deleted/failed-review/synthetic messages",
                      kind="no_assistant_turn")
      continue
    record = Record(id=f"{source}:{tree_id or lineno}", source=source, category="", messages=messages)
    yield _common.finish(record, str(path), where, category)
