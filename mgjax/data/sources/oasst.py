"""OpenAssistant exports, as trees (`oasst_trees`) or as flat messages (`oasst_messages`).

Tree export: one tree a line, `{"message_tree_id", "prompt": {..., "replies": [...]}}`.
Message export: one message a line, linked to its parent by `parent_id` (the root has
none); the reader assembles the trees first. Every message has `role` (prompter or
assistant), `text`, `lang`, `rank`, `deleted`, `review_result`, `synthetic`.

Threads are root-to-leaf paths. By default (`threads="best"`) one per tree, following
the best-ranked reply at each step, as common practice does; `threads="top_k"` follows
the `top_k` best replies at each step, `threads="all"` every path. Deleted messages and
those that failed review are removed with their subtrees before choosing, so a deleted
rank-0 reply hands its place to the next best.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common

_ROLES = {"prompter": "user", "assistant": "assistant"}
_THREADS = ("best", "top_k", "all")


def _usable(msg: dict[str, Any], drop_synthetic: bool) -> bool:
  if msg.get("deleted") or msg.get("review_result") is False:
    return False
  return not (drop_synthetic and msg.get("synthetic"))


def _ranked(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
  # rank 0 is best; a reply nobody ranked (rank None, e.g. an only child) counts as
  # worse than any ranked one; ties keep file order.
  order = lambda im: (im[1].get("rank") is None, im[1].get("rank") or 0, im[0])
  return [m for _, m in sorted(enumerate(replies), key=order)]


def _paths(msg: dict[str, Any], keep: int | None, drop_synthetic: bool) -> Iterator[list[dict[str, Any]]]:
  """Root-to-leaf message paths under msg, following the `keep` best usable replies (all if None)."""
  replies = [r for r in msg.get("replies") or [] if isinstance(r, dict) and _usable(r, drop_synthetic)]
  if not replies:
    yield [msg]
    return
  for reply in _ranked(replies)[:keep]:
    for rest in _paths(reply, keep, drop_synthetic):
      yield [msg, *rest]


def _tree_threads(tree: Any, where: str, path: str, source: str, category: str | None,
                  langs: set[str] | None, keep: int | None, drop_synthetic: bool,
                  multi: bool) -> Iterator[Record | Rejection]:
  prompt = tree.get("prompt") if isinstance(tree, dict) else None
  tree_id = tree.get("message_tree_id") if isinstance(tree, dict) else None
  reject = lambda reason, kind: Rejection(source, path, where, reason, kind=kind)
  if not isinstance(prompt, dict):
    yield reject('expected {"message_tree_id", "prompt": {...}}', "bad_schema")
    return
  if langs is not None and prompt.get("lang") not in langs:
    yield reject(f"root prompt language {prompt.get('lang')!r} not in {sorted(langs)} (reader option lang)",
                 "language")
    return
  if not _usable(prompt, drop_synthetic):
    yield reject("root prompt is deleted, failed review or synthetic", "dropped_message")
    return
  threads: list[list[dict[str, str]]] = []
  for messages in _paths(prompt, keep, drop_synthetic):
    bad = next((m for m in messages if _ROLES.get(m.get("role")) is None or not isinstance(m.get("text"), str)),
               None)
    if bad is not None:
      yield reject(f"message {bad.get('message_id')}: role must be prompter|assistant and text a string",
                   "bad_schema")
      return
    turns = [{"role": _ROLES[m["role"]], "content": m["text"]} for m in messages]
    if turns[-1]["role"] == "user":
      turns.pop()  # unanswered last prompt
    # Trimming an unanswered prompt can leave a thread that is the prefix another path
    # already gave; it adds nothing.
    if turns and turns not in threads:
      threads.append(turns)
  if not threads:
    yield reject("no assistant reply left after dropping deleted/failed-review/synthetic messages",
                 "no_assistant_turn")
    return
  base = f"{source}:{tree_id if tree_id is not None else where}"
  for i, turns in enumerate(threads):
    rid = f"{base}/{i}" if multi else base
    record = Record(id=rid, source=source, category="", messages=turns)
    yield _common.finish(record, path, f"{where} thread {i}" if multi else where, category)


def _options(reader: str, lang, threads: str, top_k: int, options: dict) -> tuple[set[str] | None, int | None]:
  if options:
    raise ValueError(f"{reader} reader: unknown options {sorted(options)} "
                     f"(known: lang, threads, top_k, drop_synthetic)")
  if threads not in _THREADS:
    raise ValueError(f"{reader} reader: threads={threads!r}; choose one of {_THREADS}")
  if threads == "top_k" and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"{reader} reader: threads='top_k' needs top_k >= 1, got {top_k!r}")
  langs = None if lang is None else ({lang} if isinstance(lang, str) else set(lang))
  keep = {"best": 1, "top_k": top_k, "all": None}[threads]
  return langs, keep


def read(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
         lang: str | list[str] | None = "en", threads: str = "best", top_k: int = 2,
         drop_synthetic: bool = False, **options) -> Iterator[Record | Rejection]:
  """Reads the tree export: one Record per thread (one per tree by default), or a Rejection.

  Args:
    lang: keep trees whose root prompt has this language (or one of these); None keeps all.
    threads: "best" (one thread per tree along rank-0 replies), "top_k" or "all".
    top_k: with threads="top_k", how many best replies to follow at each step.
    drop_synthetic: also drop messages marked `synthetic` (the bundled real test file is
      synthetic-flagged at the root of some trees, so the default keeps them).
  """
  del image_root  # OpenAssistant is text only.
  langs, keep = _options("oasst_trees", lang, threads, top_k, options)
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, tree = item
    tree_id = tree.get("message_tree_id") if isinstance(tree, dict) else None
    yield from _tree_threads(tree, f"line {lineno} (tree {tree_id})", str(path), source, category,
                             langs, keep, drop_synthetic, threads != "best")


def read_messages(path: str, *, source: str, image_root: str | None = None, category: str | None = None,
                  lang: str | list[str] | None = "en", threads: str = "best", top_k: int = 2,
                  drop_synthetic: bool = False, **options) -> Iterator[Record | Rejection]:
  """Reads the flat message export (one message a line, linked by `parent_id`).

  The messages of a whole file are linked in memory first (oasst2's ~200K messages take
  a few hundred MB), then each tree is read as `read` reads the tree export. A message
  whose parent is not in the file cannot be placed in a thread and is rejected.
  """
  del image_root
  langs, keep = _options("oasst_messages", lang, threads, top_k, options)
  by_id: dict[str, dict[str, Any]] = {}
  line_of: dict[str, int] = {}
  children: dict[str, list[str]] = collections.defaultdict(list)
  roots: list[str] = []
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, msg = item
    mid = msg.get("message_id") if isinstance(msg, dict) else None
    if not isinstance(mid, str) or mid in by_id:
      why = "missing message_id" if not isinstance(mid, str) else f"message_id {mid} appears twice"
      yield Rejection(source, str(path), f"line {lineno}", f'{why}; expected {{"message_id", "parent_id", ...}}',
                      kind="bad_schema")
      continue
    by_id[mid], line_of[mid] = dict(msg, replies=[]), lineno
    if msg.get("parent_id") is None:
      roots.append(mid)
    else:
      children[msg["parent_id"]].append(mid)
  for parent, kids in children.items():
    if parent not in by_id:
      for mid in kids:
        yield Rejection(source, str(path), f"line {line_of[mid]} (message {mid})",
                        f"parent {parent} is not in the file; export whole trees", kind="orphan_message")
      continue
    # File order among siblings, as in the tree export, so rank ties break the same way.
    by_id[parent]["replies"] = [by_id[m] for m in kids]
  for root in roots:
    tree = {"message_tree_id": by_id[root].get("message_tree_id", root), "prompt": by_id[root]}
    yield from _tree_threads(tree, f"line {line_of[root]} (tree {tree['message_tree_id']})", str(path),
                             source, category, langs, keep, drop_synthetic, threads != "best")
