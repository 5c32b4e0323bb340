"""The functions of an lmms-eval task over an mgjax validation split (mgjax_split.yaml).

A document is one assistant turn: `messages` (JSON) is the conversation before it, <image>
marking where its `images` go, `answer` the reference. Chat models (mgjax's default) get
the whole conversation with the images in place (doc_to_messages); simple models get the
last user message and the images (doc_to_text, doc_to_visual), as lmms-eval gives them.
"""

import json

from mgjax.data.records import IMAGE_PLACEHOLDER
from mgjax.evaluators.text import normalize_answer


def doc_to_visual(doc):
  return list(doc["images"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
  return json.loads(doc["messages"])[-1]["content"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
  """The conversation as lmms-eval chat messages: each <image> placeholder becomes an image
  item, the text around it text items (the newline after a placeholder stays with the text)."""
  images = iter(doc_to_visual(doc))
  messages = []
  for message in json.loads(doc["messages"]):
    content = []
    for i, text in enumerate(message["content"].split(IMAGE_PLACEHOLDER)):
      if i:
        content.append({"type": "image", "url": next(images)})
      if text:
        content.append({"type": "text", "text": text})
    messages.append({"role": message["role"], "content": content})
  return messages


def process_results(doc, results):
  return {"acc": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
