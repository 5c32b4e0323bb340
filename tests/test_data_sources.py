"""Readers: good records come through, every bad one becomes a Rejection saying where and why."""

import gzip
import json
import os
import pathlib

import pytest

from mgjax.data import sample, sources
from mgjax.data.records import Record, Rejection

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared/data"
OASST_REAL = SHARED_DATA / "oasst/en_100_tree.jsonl"


def _read(path, fmt, **kw):
  items = list(sources.read(str(path), format=fmt, source="src", **kw))
  return [r for r in items if isinstance(r, Record)], [r for r in items if isinstance(r, Rejection)]


def test_registry_names_every_format():
  assert set(sources.READERS) == {"lima", "oasst_trees", "oasst_messages", "llava_json", "messages_jsonl"}
  with pytest.raises(ValueError, match="unknown source format"):
    sources.read("x", format="nope", source="s")


# ------------------------------------------------------------------------------ LIMA


def test_lima_reads_good_rows_and_rejects_bad_ones(tmp_path):
  lines = [
      json.dumps({
          "conversations": ["Hi?", "Hello."],
          "source": "stackexchange"
      }),
      json.dumps({
          "conversations": ["Q1", "A1", "Q2 unanswered"],
          "source": "wikihow"
      }),
      '{"conversations": ["broken", ',  # line 3: malformed JSON
      json.dumps({
          "conversations": [],
          "source": "x"
      }),  # line 4: empty conversation
      "",
      json.dumps({"conversations": ["  ", "answer"]}),  # line 6: empty user turn
      json.dumps({"conversations": "not a list"}),  # line 7
      json.dumps({"conversations": ["Last?", "Fine."]}),  # line 8
  ]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  recs, rejs = _read(path, "lima")
  assert [r.id for r in recs] == ["src:1", "src:2", "src:8"]
  assert recs[1].messages == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
  assert all(r.category == "text" for r in recs)
  got = {(r.record, r.kind) for r in rejs}
  assert got == {("line 3", "invalid_json"), ("line 4", "empty_conversation"), ("line 6", "empty_turn"),
                 ("line 7", "bad_schema")}
  bad_json = next(r for r in rejs if r.kind == "invalid_json")
  assert bad_json.file == str(path) and "invalid JSON" in bad_json.reason


def test_lima_non_utf8_line_rejects_only_that_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_bytes(b'{"conversations": ["\xff\xfe", "x"]}\n' + json.dumps({
      "conversations": ["a", "b"]
  }).encode() + b"\n")
  recs, rejs = _read(path, "lima")
  assert len(recs) == 1 and [(r.record, r.kind) for r in rejs] == [("line 1", "not_utf8")]


# ------------------------------------------------------------------------------ LLaVA / Mini-Gemini JSON


def _conv(*turns):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def test_llava_json_images_categories_and_bad_records(tmp_path):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  png = sample.draw([("circle", "red", "center")])
  (root / "sub/a.png").write_bytes(png)
  (tmp_path / "secret.png").write_bytes(b"SECRET")
  os.symlink(tmp_path / "secret.png", root / "link.png")
  data = [
      {
          "id": "u1",
          "image": "sub/a.png",
          "conversations": _conv("<image>\nWhat is it?", "A square.")
      },
      {
          "id": "g1",
          "conversations": _conv("Draw a red circle. <GEN>", "<h>A red circle.</h>")
      },
      {
          "id": "t1",
          "conversations": _conv("Hi", "Hello")
      },
      {
          "id": "noplace",
          "image": ["sub/a.png"],
          "conversations": _conv("Describe.", "Blue.")
      },
      {
          "id": "missing",
          "image": "sub/nothere.png",
          "conversations": _conv("<image>\nQ", "A")
      },
      {
          "id": "escape",
          "image": "../secret.png",
          "conversations": _conv("<image>\nQ", "A")
      },
      {
          "id": "absolute",
          "image": str(tmp_path / "secret.png"),
          "conversations": _conv("<image>\nQ", "A")
      },
      {
          "id": "symlink",
          "image": "link.png",
          "conversations": _conv("<image>\nQ", "A")
      },
      {
          "id": "empty",
          "conversations": []
      },
      {
          "id": "badrole",
          "conversations": [{
              "from": "robot",
              "value": "x"
          }]
      },
      {
          "id": "noanswer",
          "conversations": [{
              "from": "human",
              "value": "anyone?"
          }]
      },
  ]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(data))
  recs, rejs = _read(path, "llava_json", image_root=str(root))
  by_id = {r.id: r for r in recs}
  assert list(by_id) == ["src:u1", "src:g1", "src:t1", "src:noplace"]
  assert by_id["src:u1"].images == [png] and by_id["src:u1"].category == "understanding"
  assert by_id["src:g1"].category == "generation" and by_id["src:t1"].category == "text"
  # A single image without a placeholder goes first in the first human turn (LLaVA's convention).
  assert by_id["src:noplace"].messages[0]["content"] == "<image>\nDescribe."
  kinds = {r.record: r.kind for r in rejs}
  assert kinds == {
      "record 4 (id=missing)": "missing_image",
      "record 5 (id=escape)": "image_path_escapes_root",
      "record 6 (id=absolute)": "image_path_escapes_root",
      "record 7 (id=symlink)": "image_path_escapes_root",
      "record 8 (id=empty)": "empty_conversation",
      "record 9 (id=badrole)": "bad_role",
      "record 10 (id=noanswer)": "no_assistant_turn"
  }
  missing = next(r for r in rejs if r.kind == "missing_image")
  assert "sub/nothere.png" in missing.reason and missing.file == str(path)
  assert all(b"SECRET" not in img for r in recs for img in r.images)


def test_llava_json_category_override_and_no_image_root(tmp_path):
  path = tmp_path / "data.json"
  path.write_text(
      json.dumps([{
          "id": "a",
          "image": "x.png",
          "conversations": _conv("<image>\nQ", "A")
      }, {
          "id": "b",
          "conversations": _conv("Q", "A")
      }]))
  recs, rejs = _read(path, "llava_json", category="generation")
  assert [r.category for r in recs] == ["generation"]
  assert rejs[0].kind == "missing_image" and "image_root" in rejs[0].reason


def test_llava_json_malformed_file_keeps_the_records_before_the_break(tmp_path):
  path = tmp_path / "data.json"
  path.write_text('[{"id": "a", ')
  recs, rejs = _read(path, "llava_json")
  assert not recs and len(rejs) == 1 and rejs[0].kind == "invalid_json" and rejs[0].record == "whole file"
  # Streamed: a file that breaks off (an interrupted download) keeps what came before.
  good = json.dumps([{"id": i, "conversations": _conv(f"Q{i}", "A")} for i in range(3)])
  path.write_text(good[:good.rindex("{")] + '{"id": 3, "conv')
  recs, rejs = _read(path, "llava_json")
  assert [r.id for r in recs] == ["src:0", "src:1"]
  assert [(r.kind, r.record) for r in rejs] == [("invalid_json", "after record 1")]
  assert "rest of the file" in rejs[0].reason
  path.write_text(json.dumps({"id": 1, "conversations": _conv("Q", "A")}))
  recs, rejs = _read(path, "llava_json")
  assert not recs and rejs[0].kind == "bad_schema" and "got a JSON map" in rejs[0].reason


def test_lazy_images_are_checked_paths_until_loaded(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  png = sample.draw([("circle", "red", "center")])
  (root / "a.png").write_bytes(png)
  (root / "cut.png").write_bytes(png[:len(png) // 2])
  path = tmp_path / "data.json"
  path.write_text(
      json.dumps([{
          "id": "a",
          "image": "a.png",
          "conversations": _conv("<image>\nQ", "A")
      }, {
          "id": "cut",
          "image": "cut.png",
          "conversations": _conv("<image>\nQ", "A")
      }, {
          "id": "out",
          "image": "../x.png",
          "conversations": _conv("<image>\nQ", "A")
      }]))
  recs, rejs = _read(path, "llava_json", image_root=str(root), lazy_images=True)
  assert [str(i) for r in recs for i in r.images] == [str(root / "a.png"), str(root / "cut.png")]
  assert [r.kind for r in rejs] == ["image_path_escapes_root"]  # checked without reading
  loaded = [sources.load_images(r) for r in recs]
  assert loaded[0].images == [png]
  assert isinstance(loaded[1],
                    Rejection) and loaded[1].kind == "corrupt_image" and loaded[1].record == "record 1 (id=cut)"


# ------------------------------------------------------------------------------ OpenAssistant trees


def _msg(mid, role, text, rank=None, replies=(), **kw):
  m = {
      "message_id": mid,
      "role": role,
      "text": text,
      "lang": "en",
      "review_result": True,
      "deleted": False,
      "synthetic": False,
      "replies": list(replies),
      **kw
  }
  if rank is not None:
    m["rank"] = rank
  return m


def test_oasst_follows_best_rank_and_drops_deleted_reviewed_and_foreign(tmp_path):
  tree1 = {
      "message_tree_id": "t1",
      "prompt": _msg(
          "p",
          "prompter",
          "Q1",
          replies=[
              _msg("a1", "assistant", "second best", rank=1),
              _msg("a0del", "assistant", "spam", rank=0, deleted=True),  # deleted: its rank 0 does not count
              _msg(
                  "a0", "assistant", "best", rank=0, replies=[
                      _msg(
                          "p2", "prompter", "Q2", replies=[
                              _msg("b_unranked", "assistant", "unranked"),
                              _msg("b_bad", "assistant", "failed review", rank=0, review_result=False),
                              _msg("b1", "assistant", "ranked", rank=1)
                          ])
                  ]),
          ])
  }
  tree2 = {
      "message_tree_id": "t2",
      "prompt": _msg("p", "prompter", "Hallo", lang="de", replies=[_msg("x", "assistant", "Hi", rank=0)])
  }
  tree3 = {
      "message_tree_id": "t3",
      "prompt": _msg(
          "p", "prompter", "Q",
          replies=[_msg("a", "assistant", "A", rank=0, replies=[_msg("q", "prompter", "unanswered follow-up")])])
  }
  tree4 = {
      "message_tree_id": "t4",
      "prompt": _msg("p", "prompter", "Q", replies=[_msg("a", "assistant", "A", rank=0, deleted=True)])
  }
  tree5 = {
      "message_tree_id": "t5",
      "prompt": _msg("p", "prompter", "Q", synthetic=True, replies=[_msg("a", "assistant", "A", rank=0)])
  }
  path = tmp_path / "trees.jsonl"
  path.write_text("\n".join(json.dumps(t) for t in (tree1, tree2, tree3, tree4, tree5)) + "\nnot json\n")

  recs, rejs = _read(path, "oasst_trees")
  assert [r.id for r in recs] == ["src:t1", "src:t3", "src:t5"]  # synthetic kept by default
  assert [m["content"] for m in recs[0].messages] == ["Q1", "best", "Q2", "ranked"]
  assert [m["role"] for m in recs[0].messages] == ["user", "assistant", "user", "assistant"]
  assert [m["content"] for m in recs[1].messages] == ["Q", "A"]  # trailing user turn trimmed
  assert {(r.record, r.kind) for r in rejs} == {("line 2 (tree t2)", "language"),
                                                ("line 4 (tree t4)", "no_assistant_turn"), ("line 6", "invalid_json")}

  recs, rejs = _read(path, "oasst_trees", drop_synthetic=True, lang=["en", "de"])
  assert [r.id for r in recs] == ["src:t1", "src:t2", "src:t3"]


@pytest.mark.skipif(
    not OASST_REAL.exists(), reason=f"real OpenAssistant trees not found at {OASST_REAL} "
    "(../shared/data sits beside the repo on dev machines and CI, not in a fresh clone)")
def test_oasst_real_tree_export():
  # Expected counts were computed independently of the reader, with a throwaway script over
  # the raw JSON: walk from each root, at each step take the reply with the lowest `rank`
  # (an unranked reply only when none is ranked; all unranked ones here are prompter
  # follow-ups, the first in file order is taken), trim a trailing prompter turn.
  # The file has no deleted, review-failed or non-English message, so all 100 trees give a
  # thread: 58 of 2 turns and 42 of 4, 284 turns in all. Dropping synthetic messages
  # removes the 5 trees whose root prompt is synthetic (the other 17 synthetic messages
  # sit in those trees too): 95 threads, 274 turns.
  recs, rejs = _read(OASST_REAL, "oasst_trees")
  assert len(recs) == 100 and not rejs
  lengths = sorted(len(r.messages) for r in recs)
  assert lengths.count(2) == 58 and lengths.count(4) == 42 and sum(lengths) == 284
  for r in recs:
    assert [m["role"] for m in r.messages] == ["user", "assistant"] * (len(r.messages) // 2)
    assert r.category == "text"
  first = recs[0]
  assert first.messages[0]["content"] == "How can I find the best 401k plan for my needs?"
  assert first.messages[1]["content"].startswith("The first step is to research your options.")  # rank 0

  recs, rejs = _read(OASST_REAL, "oasst_trees", drop_synthetic=True)
  assert len(recs) == 95 and sum(len(r.messages) for r in recs) == 274
  assert len(rejs) == 5 and {r.kind for r in rejs} == {"dropped_message"}


@pytest.mark.skipif(
    not OASST_REAL.exists(), reason=f"real OpenAssistant trees not found at {OASST_REAL} "
    "(../shared/data sits beside the repo on dev machines and CI, not in a fresh clone)")
def test_oasst_real_top_k_and_all_threads():
  # Counted independently with a throwaway script over the raw JSON: flatten every
  # message with its parent, keep at each message the k best children (rank order,
  # unranked last, ties in file order; all children for "all"), take every root-to-leaf
  # path of kept messages, trim a trailing prompter turn, drop paths that became equal.
  # top-2: 284 threads, 904 turns; all: 564 threads, 1844 turns.
  recs, rejs = _read(OASST_REAL, "oasst_trees", threads="top_k", top_k=2)
  assert (len(recs), sum(len(r.messages) for r in recs), len(rejs)) == (284, 904, 0)
  assert len({r.id for r in recs}) == 284 and recs[0].id.endswith("/0")
  recs, rejs = _read(OASST_REAL, "oasst_trees", threads="all")
  assert (len(recs), sum(len(r.messages) for r in recs), len(rejs)) == (564, 1844, 0)
  with pytest.raises(ValueError, match="threads="):
    _read(OASST_REAL, "oasst_trees", threads="longest")


@pytest.mark.skipif(not OASST_REAL.exists(), reason=f"real OpenAssistant trees not found at {OASST_REAL}")
def test_oasst_flat_message_export_gives_the_same_threads(tmp_path):
  # The flat export of the same trees (messages in tree order, linked by parent_id), plus a
  # message whose parent is not in the file and a broken line.
  rows = []
  for line in OASST_REAL.read_text().splitlines():
    tree = json.loads(line)
    queue = [tree["prompt"]]
    while queue:
      msg = queue.pop(0)
      queue += msg.get("replies", [])
      rows.append(
          json.dumps({
              **{
                  k: v for k, v in msg.items() if k != "replies"
              }, "message_tree_id": tree["message_tree_id"]
          }))
  rows += [json.dumps({"message_id": "orphan", "parent_id": "nowhere", "role": "assistant", "text": "x"}), "{"]
  path = tmp_path / "messages.jsonl.gz"
  path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
  recs, rejs = _read(path, "oasst_messages")
  trees, _ = _read(OASST_REAL, "oasst_trees")
  assert [r.messages for r in recs] == [r.messages for r in trees]
  assert {(r.record, r.kind) for r in rejs} == {(f"line {len(rows) - 1} (message orphan)", "orphan_message"),
                                                (f"line {len(rows)}", "invalid_json")}
  recs, _ = _read(path, "oasst_messages", threads="all")
  assert len(recs) == 564


def test_messages_jsonl_reads_roles_images_and_ids(tmp_path):
  (tmp_path / "img").mkdir()
  png = sample.draw([("triangle", "green", "left")])
  (tmp_path / "img/a.png").write_bytes(png)
  rows = [{
      "id": "x",
      "messages": [{
          "role": "system",
          "content": "Be brief."
      }, {
          "role": "user",
          "content": "<image>\nShape?"
      }, {
          "role": "assistant",
          "content": "A triangle."
      }],
      "images": ["a.png"]
  }, {
      "messages": [{
          "role": "user",
          "content": "Hi"
      }, {
          "role": "assistant",
          "content": "Hello"
      }]
  }]
  path = tmp_path / "chat.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  recs, rejs = _read(path, "messages_jsonl", image_root=str(tmp_path / "img"))
  assert not rejs and [r.id for r in recs] == ["src:x", "src:2"]
  assert recs[0].images == [png] and recs[0].category == "understanding" and recs[0].messages[0]["role"] == "system"
  assert recs[1].category == "text"
