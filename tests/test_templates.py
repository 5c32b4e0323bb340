"""Conversation templates of the real LLMs: Mini-Gemini's layouts, and assistant masks that
cover exactly the answers and the tokens ending them, through the training pipeline too."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mgjax.data import chat_tokenizers, pipeline, templates, tokenizer_training

TEXTS = [
    "What is in the picture? A red circle on a white background.",
    "And the colour? Red, mostly. A chat between a curious user and an assistant."
]
QUESTION, ANSWER = "<image>\nWhat is in the picture?", "A red circle."
QUESTION2, ANSWER2 = "And the colour?", "Red, mostly."
MESSAGES = [{
    "role": "user",
    "content": QUESTION
}, {
    "role": "assistant",
    "content": ANSWER
}, {
    "role": "user",
    "content": QUESTION2
}, {
    "role": "assistant",
    "content": ANSWER2
}]

# The text Mini-Gemini's conversation.py makes of MESSAGES (bos/eos are the test tokenizer's
# <s> and </s>, where the real tokenizers have their own), and the supervised runs.
LLAMA_3_HEAD = ("<s><|start_header_id|>system<|end_header_id|>\n\n" + templates.LLAMA_3_SYSTEM + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n" + QUESTION + "<|eot_id|>")
EXPECTED = {
    "vicuna_v1": ("<s>" + templates.VICUNA_SYSTEM + f" USER: {QUESTION} ASSISTANT: {ANSWER}</s>"
                  f"USER: {QUESTION2} ASSISTANT: {ANSWER2}</s>", [f" {ANSWER}</s>", f" {ANSWER2}</s>"]),
    "gemma": (f"<s><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n{ANSWER}<end_of_turn>\n</s>"
              f"<start_of_turn>user\n{QUESTION2}<end_of_turn>\n<start_of_turn>model\n{ANSWER2}<end_of_turn>\n</s>",
              [f"{ANSWER}<end_of_turn>\n</s>", f"{ANSWER2}<end_of_turn>\n</s>"]),
    "llama_3": (LLAMA_3_HEAD + f"<|start_header_id|>system<|end_header_id|>\n\n{ANSWER}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION2}<|eot_id|>"
                f"<|start_header_id|>system<|end_header_id|>\n\n{ANSWER2}<|eot_id|>",
                [f"{ANSWER}<|eot_id|>", f"{ANSWER2}<|eot_id|>"]),
    "llama_3_instruct": (LLAMA_3_HEAD + f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>"
                         f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION2}<|eot_id|>"
                         f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER2}<|eot_id|>",
                         [f"{ANSWER}<|eot_id|>", f"{ANSWER2}<|eot_id|>"]),
    "chatml": (f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{QUESTION}<|im_end|>"
               f"<|im_start|>assistant\n{ANSWER}<|im_end|><|im_start|>user\n{QUESTION2}<|im_end|>"
               f"<|im_start|>assistant\n{ANSWER2}<|im_end|>", [f"{ANSWER}<|im_end|>", f"{ANSWER2}<|im_end|>"]),
    "mistral_instruct": (f"<s>[INST] {QUESTION} [/INST] {ANSWER} </s><s>[INST] {QUESTION2} [/INST] {ANSWER2} </s>",
                         [f" {ANSWER} </s>", f" {ANSWER2} </s>"]),
    # SmolLM2-Instruct's own layout (tests/test_real_llm.py checks it against its tokenizer's template).
    "smollm2": (f"<|im_start|>system\n{templates.SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n<|im_start|>user\n{QUESTION2}<|im_end|>\n"
                f"<|im_start|>assistant\n{ANSWER2}<|im_end|>\n", [f"{ANSWER}<|im_end|>", f"{ANSWER2}<|im_end|>"]),
}
END_OF_ANSWER = {
    "llama_3": "<|eot_id|>",
    "llama_3_instruct": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "smollm2": "<|im_end|>"
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A small byte-level BPE saved to disk; each test loads a fresh copy to prepare."""
  out = str(tmp_path_factory.mktemp("tok"))
  tokenizer_training.train_sample_tokenizer(TEXTS, out, vocab_size=300)
  return out


def _prepared(base_dir, name):
  return chat_tokenizers.apply_template(chat_tokenizers.load(base_dir), name)


def _runs(ids, mask):
  """Contiguous runs of masked token ids."""
  runs, current = [], []
  for token, m in zip(ids, mask):
    if m:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  return runs + ([current] if current else [])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layout_and_assistant_mask(base_dir, name):
  tok = _prepared(base_dir, name)
  text, runs = EXPECTED[name]
  assert tok.apply_chat_template(MESSAGES, tokenize=False) == text
  encoded = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = encoded["input_ids"], encoded["assistant_masks"]
  assert [tok.decode(r) for r in _runs(ids, mask)] == runs
  # Every special token of the format, and <image>, is one token.
  for special in (*templates.TEMPLATES[name][1], templates.IMAGE):
    assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
  assert ids.count(tok.convert_tokens_to_ids(templates.IMAGE)) == 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_prompt_is_what_precedes_an_answer(base_dir, name):
  """Prompting at inference reproduces the training text up to the answer, and generation
  stops at the token that ended answers in training."""
  tok = _prepared(base_dir, name)
  prompt = tok.apply_chat_template(MESSAGES[:3], tokenize=False, add_generation_prompt=True)
  full = tok.apply_chat_template(MESSAGES, tokenize=False)
  assert full.startswith(prompt) and full[len(prompt):].lstrip().startswith(ANSWER2)
  assert EXPECTED[name][1][-1].endswith(tok.eos_token)
  assert tok.eos_token == END_OF_ANSWER.get(name, "</s>")


def test_system_message_replaces_the_default(base_dir):
  tok = _prepared(base_dir, "vicuna_v1")
  text = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, *MESSAGES], tokenize=False)
  assert text.startswith("<s>Be terse. USER: ") and templates.VICUNA_SYSTEM not in text
  gemma = _prepared(base_dir, "gemma").apply_chat_template([{
      "role": "system",
      "content": "Be terse."
  }, *MESSAGES], tokenize=False)
  assert gemma.startswith(f"<s><start_of_turn>user\nBe terse.\n\n{QUESTION}<end_of_turn>")


def test_unknown_template_and_role(base_dir):
  with pytest.raises(ValueError, match="model.template='vicuna'"):
    _prepared(base_dir, "vicuna")
  tok = _prepared(base_dir, "chatml")
  with pytest.raises(Exception, match="role tool"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_empty_name_keeps_the_tokenizers_own_template(base_dir):
  tok = _prepared(base_dir, "")
  assert tok.chat_template == templates.SAMPLE_CHAT_TEMPLATE and tok.eos_token == "</s>"


@pytest.mark.parametrize("own, suggested", [
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}", "chatml"),
    ("{{ 'You are SmolLM' }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}", "smollm2"),
    ("{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}", "llama_3_instruct"),
    ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}", "mistral_instruct"),
])
def test_an_own_template_that_marks_no_answers_is_refused_with_the_template_to_use(base_dir, own, suggested):
  tok = chat_tokenizers.load(base_dir)
  tok.chat_template = own
  with pytest.raises(ValueError, match=rf"marks no answers .* --config\.model\.template={suggested} "):
    chat_tokenizers.apply_template(tok, "")
  tok.chat_template = None
  with pytest.raises(ValueError, match="has no chat template; set --config.model.template to the LLM's"):
    chat_tokenizers.apply_template(tok, "")


@pytest.mark.parametrize("name", ["gemma", "llama_3"])
def test_pipeline_trains_on_exactly_the_answers(base_dir, name):
  """Through ConversationEncoder: <image> expands into the image's tokens, and the loss mask
  (on targets) selects exactly the supervised runs."""
  tok = _prepared(base_dir, name)
  png = io.BytesIO()
  Image.new("RGB", (40, 30), (200, 30, 30)).save(png, format="PNG")
  encoder = pipeline.ConversationEncoder(tok, seq_len=512, num_image_tokens=4, max_images=1, lowres_size=32,
                                         highres_size=64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
  example = {
      "messages": {
          "role": [m["role"] for m in MESSAGES],
          "content": [m["content"] for m in MESSAGES]
      },
      "images": [png.getvalue()]
  }
  out = encoder.unpadded(example)
  assert int((out["input_ids"] == encoder.image_token_id).sum()) == 4
  runs = _runs(out["targets"].tolist(), out["loss_mask"].tolist())
  assert [tok.decode(r) for r in runs] == EXPECTED[name][1]
  assert out["images_lowres"].shape == (1, 32, 32, 3)


# A LLaVA record whose image comes after the question (about half of LLaVA's do), and what
# Mini-Gemini trains on for it: preprocess_multimodal moves "<image>\n" to the front of the
# turn and strips the rest, then conversation.py lays the turns out.
IMAGE_LAST = [{
    "role": "user",
    "content": "What is in the picture?\n<image>"
}, {
    "role": "assistant",
    "content": ANSWER
}, {
    "role": "user",
    "content": "  Look again:\n<image>\nWhat colour?"
}, {
    "role": "assistant",
    "content": ANSWER2
}]
IMAGE_LAST_EXPECTED = {
    "vicuna_v1":
        ("<s>" + templates.VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: A red circle.</s>"
         "USER: <image>\nLook again:\n\nWhat colour? ASSISTANT: Red, mostly.</s>",
         [" A red circle.</s>", " Red, mostly.</s>"]),
    "gemma": ("<s><start_of_turn>user\n<image>\nWhat is in the picture?<end_of_turn>\n<start_of_turn>model\n"
              "A red circle.<end_of_turn>\n</s><start_of_turn>user\n<image>\nLook again:\n\nWhat colour?<end_of_turn>\n"
              "<start_of_turn>model\nRed, mostly.<end_of_turn>\n</s>",
              ["A red circle.<end_of_turn>\n</s>", "Red, mostly.<end_of_turn>\n</s>"]),
    "llama_3": ("<s><|start_header_id|>system<|end_header_id|>\n\n" + templates.LLAMA_3_SYSTEM + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the picture?<|eot_id|>"
                "<|start_header_id|>system<|end_header_id|>\n\nA red circle.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n<image>\nLook again:\n\nWhat colour?<|eot_id|>"
                "<|start_header_id|>system<|end_header_id|>\n\nRed, mostly.<|eot_id|>",
                ["A red circle.<|eot_id|>", "Red, mostly.<|eot_id|>"]),
}


@pytest.mark.parametrize("name", sorted(IMAGE_LAST_EXPECTED))
def test_images_go_first_as_mini_gemini_puts_them(base_dir, name):
  """Training text, supervised spans and the inference prompt all have the image first."""
  tok = _prepared(base_dir, name)
  text, runs = IMAGE_LAST_EXPECTED[name]
  assert tok.apply_chat_template(IMAGE_LAST, tokenize=False) == text
  encoded = tok.apply_chat_template(IMAGE_LAST, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  assert [tok.decode(r) for r in _runs(encoded["input_ids"], encoded["assistant_masks"])] == runs
  prompt = tok.apply_chat_template(IMAGE_LAST[:1], tokenize=False, add_generation_prompt=True)
  assert text.startswith(prompt) and "<image>\nWhat is in the picture?" in prompt


def test_sample_template_puts_images_first_too(base_dir):
  text = _prepared(base_dir, "").apply_chat_template(IMAGE_LAST[:2], tokenize=False)
  assert text == "<s><|user|><image>\nWhat is in the picture?</s><|assistant|>A red circle.</s>"


def test_plain_template_is_image_then_caption(base_dir):
  """Pretraining's layout (MGM's preprocess_plain): the question is dropped, the caption and
  its newline are the only supervised tokens."""
  tok = _prepared(base_dir, "plain")
  record = [{
      "role": "user",
      "content": "Describe the image briefly.\n<image>"
  }, {
      "role": "assistant",
      "content": ANSWER
  }]
  assert tok.apply_chat_template(record, tokenize=False) == f"<s><image>{ANSWER}\n"
  encoded = tok.apply_chat_template(record, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  assert [tok.decode(r) for r in _runs(encoded["input_ids"], encoded["assistant_masks"])] == [f"{ANSWER}\n"]
  assert tok.apply_chat_template(record[:1], tokenize=False, add_generation_prompt=True) == "<s><image>"
  with pytest.raises(Exception, match="needs an <image>"):
    tok.apply_chat_template([{
        "role": "user",
        "content": "Hi"
    }, {
        "role": "assistant",
        "content": "Hello"
    }], tokenize=False)
