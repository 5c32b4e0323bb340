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
import reprlib
from typing import Any, Iterator

from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common

_ROLES = {"prompter": "user", "assistant": "assistant"}
_THREADS = ("best", "top_k", "all")
# Values quoted in rejection reasons are abbreviated: a bad field may hold anything.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlevel = 2


def _usable(msg: dict[str, Any], drop_synthetic: bool) -> bool:
  if msg.get("deleted") or msg.get("review_result") is False:
    return False
  return not (drop_synthetic and msg.get("synthetic"))


class _BadTree(ValueError):
  """A message whose fields have the wrong types; the whole tree is rejected."""


def _show(value: Any) -> str:
  return _SHORT.repr(value)


def _name(value: Any) -> str:
  """An id as a rejection's `record` shows it: as is when a short string."""
  return value if isinstance(value, str) and len(value) <= 100 else _show(value)


def _rank(msg: dict[str, Any]) -> float | None:
  rank = msg.get("rank")
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
    raise _BadTree(f"message {_show(msg.get('message_id'))}: rank is {_show(rank)}, expected an integer "
                   "or null")
  return rank


def _ranked(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
  # rank 0 is best; a reply nobody ranked (rank None, e.g. an only child) counts as
  # worse than any ranked one; ties keep file order.
  ranks = [_rank(m) for m in replies]
  order = sorted(range(len(replies)), key=lambda i: (ranks[i] is None, ranks[i] or 0, i))
  return [replies[i] for i in order]


def _paths(root: dict[str, Any], keep: int | None, drop_synthetic: bool) -> Iterator[list[dict[str, Any]]]:
  """Root-to-leaf message paths under root, following the `keep` best usable replies (all
  if None), depth first in rank order. Iterative: a thread may be thousands of turns long.

  Raises:
    _BadTree: a message on the way has replies that are not a list or a rank that is not a number.
  """
  stack = [(root, None)]  # (message, the path to its parent as a linked list)
  while stack:
    msg, parent = stack.pop()
    link = (msg, parent)
    replies = msg.get("replies")
    if replies is not None and not isinstance(replies, list):
      raise _BadTree(f"message {_show(msg.get('message_id'))}: replies is {type(replies).__name__}, "
                     "expected a list")
    usable = [r for r in replies or [] if isinstance(r, dict) and _usable(r, drop_synthetic)]
    if usable:
      stack.extend((reply, link) for reply in reversed(_ranked(usable)[:keep]))
      continue
    path = []
    while link is not None:
      path.append(link[0])
      link = link[1]
    yield path[::-1]


def _role(msg: dict[str, Any]) -> str | None:
  role = msg.get("role")
  return _ROLES.get(role) if isinstance(role, str) else None


def _tree_threads(tree: Any, where: str, path: str, source: str, category: str | None, langs: set[str] | None,
                  keep: int | None, drop_synthetic: bool, multi: bool) -> Iterator[Record | Rejection]:
  prompt = tree.get("prompt") if isinstance(tree, dict) else None
  tree_id = tree.get("message_tree_id") if isinstance(tree, dict) else None
  reject = lambda reason, kind: Rejection(source, path, where, reason, kind=kind)
  if not isinstance(prompt, dict):
    yield reject('expected {"message_tree_id", "prompt": {...}}', "bad_schema")
    return
  lang = prompt.get("lang")
  if lang is not None and not isinstance(lang, str):
    yield reject(f'root prompt lang is {_show(lang)}, expected a language code such as "en"', "bad_schema")
    return
  if langs is not None and lang not in langs:
    yield reject(f"root prompt language {lang!r} not in {sorted(langs)} (reader option lang)", "language")
    return
  if not _usable(prompt, drop_synthetic):
    yield reject("root prompt is deleted, failed review or synthetic", "dropped_message")
    return
  threads: list[list[dict[str, str]]] = []
  paths = _paths(prompt, keep, drop_synthetic)
  while True:
    try:
      messages = next(paths, None)
    except _BadTree as e:
      yield reject(str(e), "bad_schema")
      return
    if messages is None:
      break
    bad = next((m for m in messages if _role(m) is None or not isinstance(m.get("text"), str)), None)
    if bad is not None:
      yield reject(f"message {_show(bad.get('message_id'))}: role must be prompter|assistant and text a "
                   "string", "bad_schema")
      return
    turns = [{"role": _role(m), "content": m["text"]} for m in messages]
    if turns[-1]["role"] == "user":
      turns.pop()  # unanswered last prompt
    # Trimming an unanswered prompt can leave a thread that is the prefix another path
    # already gave; it adds nothing.
    if turns and turns not in threads:
      threads.append(turns)
  if not threads:
    yield reject("no assistant reply left after dropping deleted/failed-review/synthetic messages", "no_assistant_turn")
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
         lang: str | list[str] | None = "en", threads: str = "best", top_k: int = 2, drop_synthetic: bool = False,
         **options) -> Iterator[Record | Rejection]:
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
    yield from _tree_threads(tree, f"line {lineno} (tree {_name(tree_id)})", str(path), source, category, langs, keep,
                             drop_synthetic, threads != "best")


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
  parent_of: dict[str, str] = {}
  children: dict[str, list[str]] = collections.defaultdict(list)
  roots: list[str] = []
  for item in _common.iter_jsonl(path, source):
    if isinstance(item, Rejection):
      yield item
      continue
    lineno, msg = item
    mid = msg.get("message_id") if isinstance(msg, dict) else None
    parent = msg.get("parent_id") if isinstance(msg, dict) else None
    if not isinstance(mid, str) or mid in by_id or not (parent is None or isinstance(parent, str)):
      why = ("missing message_id" if not isinstance(mid, str) else f"message_id {mid} appears twice"
             if mid in by_id else f"parent_id is {_show(parent)}, expected a message_id or null")
      yield Rejection(source, str(path), f"line {lineno}", f'{why}; expected {{"message_id", "parent_id", ...}}',
                      kind="bad_schema")
      continue
    by_id[mid], line_of[mid] = dict(msg, replies=[]), lineno
    if parent is None:
      roots.append(mid)
    else:
      parent_of[mid] = parent
      children[parent].append(mid)
  for parent, kids in children.items():
    if parent in by_id:
      # File order among siblings, as in the tree export, so rank ties break the same way.
      by_id[parent]["replies"] = [by_id[m] for m in kids]
  for root in roots:
    tree = {"message_tree_id": by_id[root].get("message_tree_id", root), "prompt": by_id[root]}
    yield from _tree_threads(tree, f"line {line_of[root]} (tree {_name(tree['message_tree_id'])})", str(path), source,
                             category, langs, keep, drop_synthetic, threads != "best")
  yield from _unplaced(by_id, parent_of, children, roots, line_of, str(path), source)


def _unplaced(by_id: dict[str, Any], parent_of: dict[str, str], children: dict[str, list[str]], roots: list[str],
              line_of: dict[str, int], path: str, source: str) -> Iterator[Rejection]:
  """A Rejection for every message no root leads to, so each line is accounted for: those
  whose parent (or an ancestor's parent) is not in the file, and those whose parent_id
  chain loops (a message its own parent, or A -> B -> A) and so never reaches a root."""
  placed, todo = set(roots), list(roots)
  while todo:
    for kid in children.get(todo.pop(), ()):
      if kid not in placed:
        placed.add(kid)
        todo.append(kid)
  cause: dict[str, tuple[str, str]] = {}  # message -> (kind, reason), shared along a chain
  for mid in by_id:
    if mid in placed or mid in cause:
      continue
    chain, on_chain, cur = [], set(), mid
    while cur not in cause and cur not in on_chain:
      chain.append(cur)
      on_chain.add(cur)
      parent = parent_of[cur]
      if parent not in by_id:
        cause[cur] = ("orphan_message", f"parent {_show(parent)} of message {_show(cur)} is not in the file; "
                      "export whole trees")
        break
      cur = parent
    else:
      if cur not in cause:  # the chain came back to a message on it: a loop
        loop = chain[chain.index(cur):]
        shown = " -> ".join(_show(m) for m in loop[:5]) + (" -> ..." if len(loop) > 5 else "")
        what = "is its own parent" if len(loop) == 1 else f"is in a parent_id loop ({shown} -> {_show(cur)})"
        cause[cur] = ("parent_cycle", f"message {_show(cur)} {what}, so its thread never reaches a root "
                      "message (one without parent_id); fix parent_id")
    found = cause[chain[-1]] if chain[-1] in cause else cause[cur]
    for m in chain:
      cause.setdefault(m, found)
  for mid in by_id:
    if mid not in placed:
      kind, reason = cause[mid]
      yield Rejection(source, path, f"line {line_of[mid]} (message {_name(mid)})", reason, kind=kind)
