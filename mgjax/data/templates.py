"""Chat templates (Jinja, Hugging Face style) for tokenizers mgjax trains itself.

Assistant turns sit inside `{% generation %}...{% endgeneration %}` so that
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly
the tokens the loss is taken on. The end-of-turn token is inside the block too: the
model must learn to emit it, or it would never stop generating.

Layout of one conversation (no newlines between turns; role markers are single tokens):

  <s><|user|>What is 2 + 3?</s><|assistant|>2 + 3 = 5.</s>
                                            ^^^^^^^^^^^^^^ loss mask
"""

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

SAMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
