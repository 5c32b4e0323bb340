"""The sample tokenizer: saved in HF format, loads offline, masks exactly the assistant turns."""

import pytest
import transformers

from mgjax.data import chat_tokenizers, tokenizer_training

TEXTS = [
    "What is 2 + 3?", "2 + 3 = 5.", "<image>\nWhat colour is the circle?", "Red.", "Draw a red circle. <GEN>",
    "<h>A flat red circle on a plain white background.</h>", "How do you spell 'green'?", "G-R-E-E-N."
] * 20

CONVERSATION = [
    {
        "role": "system",
        "content": "Answer briefly."
    },
    {
        "role": "user",
        "content": "<image>\nWhat colour is the circle?"
    },
    {
        "role": "assistant",
        "content": "Red."
    },
    {
        "role": "user",
        "content": "Draw a red circle. <GEN>"
    },
    {
        "role": "assistant",
        "content": "<h>A flat red circle.</h>"
    },
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  tokenizer_training.train_sample_tokenizer(TEXTS, str(out), vocab_size=300)
  return str(out)


def test_loads_offline_with_fixed_special_tokens(tok_dir):
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert tok.convert_tokens_to_ids("<image>") == 3
  # <image> is one id wherever it stands, so the pipeline can expand it to N visual tokens.
  ids = tok.encode("look: <image>\nnow", add_special_tokens=False)
  assert ids.count(3) == 1
  assert len(tok) <= 300


@pytest.mark.parametrize(
    "text",
    ["What is 12 + 30?", "Ünïcødé and emoji 🙂 still round-trip.", "  spaces\tand\nnewlines  ", "<h>prompt</h> <GEN>"])
def test_round_trip(tok_dir, text):
  tok = chat_tokenizers.load(tok_dir)
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_assistant_mask_is_exactly_the_assistant_content_and_end_token(tok_dir):
  tok = chat_tokenizers.load(tok_dir)
  out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
  ids, mask = out["input_ids"], out["assistant_masks"]
  assert len(ids) == len(mask)
  spans, start = [], None
  for i, m in enumerate(mask + [0]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      spans.append((start, i))
      start = None
  assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
  assert len(spans) == len(assistant)
  assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
  for (a, b), content in zip(spans, assistant):
    assert ids[a - 1] == assistant_id  # the role marker itself is not learned
    assert ids[b - 1] == tok.eos_token_id  # the end-of-turn token is: the model learns to stop
    assert tok.decode(ids[a:b]) == content + "</s>"
  # Everything else (bos, system, user turns, markers) is outside the mask.
  unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
  assert unmasked.startswith("<s><|system|>Answer briefly.</s><|user|><image>")


def test_generation_prompt_ends_with_assistant_marker(tok_dir):
  tok = chat_tokenizers.load(tok_dir)
  text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
  assert text == "<s><|system|>Answer briefly.</s><|user|><image>\nWhat colour is the circle?</s><|assistant|>"
