"""Chat templates (Jinja, Hugging Face style) for tokenizers mgjax trains itself.

Assistant turns sit inside `{% generation %}...{% endgeneration %}` so that
`tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly
the tokens the loss is taken on. The end-of-turn token is inside the block too: the
model must learn to emit it, or it would never stop generating.

Layout of one conversation (no newlines between turns; role markers are single tokens):

  <s><|user|>What is 2 + 3?</s><|assistant|>2 + 3 = 5.</s>
                                            ^^^^^^^^^^^^^^ loss mask

Every template puts a turn's images first, as Mini-Gemini's `preprocess_multimodal`
(mgm/train/train.py) does before any template: the `<image>` placeholders are taken out,
the rest stripped, and `<image>\n` put in front ("What is this?\n<image>" and
"<image>\nWhat is this?" give the same prompt). Training and inference prompts both come
from the template, so they agree. Mini-Gemini keeps one image per conversation and so one
placeholder; a turn with k images here gets k placeholders, each on its own line.
"""

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

# Jinja: `content` with its images moved to the front (see the module docstring). Python's
# str.strip on both sides, as MGM's code: ("<image>\n" * k + rest.strip()).strip().
IMAGES_FIRST = (
    "{% if '<image>' in content %}"
    "{% set content = ('<image>\\n' * content.count('<image>') + content.replace('<image>', '').strip()).strip() %}"
    "{% endif %}")

SAMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}" + IMAGES_FIRST + "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ content }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "<|{{ message['role'] }}|>{{ content }}{{ eos_token }}"
    "{% else %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# ---------------------------------------------------------------------------------------
# The real LLMs' conversation formats, as Mini-Gemini (mgm/conversation.py, after LLaVA)
# lays them out. Supervised: each answer and the tokens that end its turn, as MGM's
# preprocess_* functions label them. `<image>` goes first in its turn (IMAGES_FIRST); it must
# be one token (see chat_tokenizers.py).
# ---------------------------------------------------------------------------------------

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the "
                  "visual content that the user provides, and assist the user with a variety of "
                  "tasks using natural language.")
CHATML_SYSTEM = "Answer the questions."


def _chat_template(*, start: str, system: str | None, system_turn: str, user_turn: str, assistant_prefix: str,
                   assistant_turn: str, system_in_first_user: str = "system + '\\n\\n' + content",
                   assistant_suffix: str = "") -> str:
  """A Jinja chat template from its pieces. No whitespace control anywhere: the template has no
  layout whitespace to strip, and every space and newline in it is part of the format.

  system: the default system prompt (a leading system message replaces it); None for a
  format without one, where a system message goes into the first question as the Jinja
  expression `system_in_first_user` (of `system` and `content`) puts it.
  system_turn / user_turn: Jinja for those turns, with `content` in scope.
  assistant_prefix: the text before an answer, also the generation prompt.
  assistant_turn: the supervised part, with `content` in scope; it goes inside
  {% generation %} so the assistant mask covers it exactly.
  assistant_suffix: text after the answer that is not supervised (a newline between turns).
  """
  head = ("{% if messages and messages[0]['role'] == 'system' %}"
          "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
          "{% else %}"
          f"{{% set system = {system!r} %}}{{% set turns = messages %}}"
          "{% endif %}")
  if system is None:
    head = head.replace("{% set system = None %}", "{% set system = '' %}")
    opening = start
    first_user = f"{{% if loop.first and system %}}{{% set content = {system_in_first_user} %}}{{% endif %}}"
  else:
    opening = start + "{% set content = system %}" + system_turn
    first_user = ""
  return (head + opening + "{% for message in turns %}"
          "{% set content = message['content'] %}" + IMAGES_FIRST + "{% if message['role'] == 'user' %}" + first_user +
          user_turn + "{% elif message['role'] == 'assistant' %}" + assistant_prefix + "{% generation %}" +
          assistant_turn + "{% endgeneration %}" + assistant_suffix + "{% else %}"
          "{{ raise_exception('role ' + message['role'] + ' where user or assistant was expected') }}"
          "{% endif %}"
          "{% endfor %}"
          "{% if add_generation_prompt %}" + assistant_prefix + "{% endif %}")


# vicuna_v1 (MGM-7B/13B): "<s>SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>".
# The space after "ASSISTANT:" is inside the supervised part, so the generation prompt
# "ASSISTANT:" is exactly what precedes an answer in training (sentencepiece glues the space
# to the answer's first token either way).
VICUNA_V1 = _chat_template(start="{{ bos_token }}", system=VICUNA_SYSTEM, system_turn="{{ content }} ",
                           user_turn="USER: {{ content }} ", assistant_prefix="ASSISTANT:",
                           assistant_turn=" {{ content }}{{ eos_token }}")

# gemma (MGM-2B): "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\na<end_of_turn>\n<eos>".
# MGM ends every model turn with <eos> too (conv_gemma's sep2), so the tokenizer's eos stops
# generation. Gemma has no system turn: a system message goes before the first question.
GEMMA = _chat_template(start="{{ bos_token }}", system=None, system_turn="",
                       user_turn="<start_of_turn>user\n{{ content }}<end_of_turn>\n",
                       assistant_prefix="<start_of_turn>model\n",
                       assistant_turn="{{ content }}<end_of_turn>\n{{ eos_token }}")


def _llama_3(assistant_header: str) -> str:
  return _chat_template(start="{{ bos_token }}", system=LLAMA_3_SYSTEM,
                        system_turn="<|start_header_id|>system<|end_header_id|>\n\n{{ content }}<|eot_id|>",
                        user_turn="<|start_header_id|>user<|end_header_id|>\n\n{{ content }}<|eot_id|>",
                        assistant_prefix=f"<|start_header_id|>{assistant_header}<|end_header_id|>\n\n",
                        assistant_turn="{{ content }}<|eot_id|>")


# llama_3 (MGM-8B): Mini-Gemini's conv_llama_3 heads its answers "system", not "assistant"
# (roles=(user, system) in mgm/conversation.py), and MGM-8B was trained and is prompted that
# way, so this template keeps it. llama_3_instruct is Meta's own layout, for a Llama-3-Instruct
# that was not trained by Mini-Gemini.
LLAMA_3 = _llama_3("system")
LLAMA_3_INSTRUCT = _llama_3("assistant")

# chatml (MGM-34B on Nous-Hermes-2-Yi-34B): LLaVA's chatml_direct, turns joined with no newline:
# "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nq<|im_end|><|im_start|>assistant\na<|im_end|>".
CHATML = _chat_template(start="", system=CHATML_SYSTEM, system_turn="<|im_start|>system\n{{ content }}<|im_end|>",
                        user_turn="<|im_start|>user\n{{ content }}<|im_end|>",
                        assistant_prefix="<|im_start|>assistant\n", assistant_turn="{{ content }}<|im_end|>")

# smollm2 (SmolLM2-Instruct, the mgm_smol preset): SmolLM2's own ChatML, as its tokenizer's chat
# template writes it: every turn ends "<|im_end|>\n", and a conversation without a system turn
# gets SmolLM2's default system prompt. Supervised: the answer and its <|im_end|>; the newline
# after it is not (the model stops at <|im_end|>).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2 = _chat_template(
    start="",
    system=SMOLLM2_SYSTEM,
    system_turn="<|im_start|>system\n{{ content }}<|im_end|>\n",
    user_turn="<|im_start|>user\n{{ content }}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_turn="{{ content }}<|im_end|>",
    # An expression: transformers renders with trim_blocks, which would drop a
    # newline written right after {% endgeneration %}.
    assistant_suffix="{{ '\\n' }}")

# mistral_instruct (MGM-8x7B on Mixtral-8x7B-Instruct): LLaVA's llama_2 separator style with no
# system prompt, each question opened by <s>: "<s>[INST] q [/INST] a </s><s>[INST] q2 [/INST] a2 </s>".
# Supervised as MGM's preprocess_llama_2 labels it: " a </s>" (the space after [/INST] goes with
# the answer, so the generation prompt ends at "[/INST]"). A system message is wrapped as
# Llama 2 wraps it, "<<SYS>>\nsystem\n<</SYS>>\n\n", before the first question.
MISTRAL_INSTRUCT = _chat_template(start="", system=None, system_turn="",
                                  user_turn="{{ bos_token }}[INST] {{ content }} [/INST]", assistant_prefix="",
                                  assistant_turn=" {{ content }} {{ eos_token }}",
                                  system_in_first_user="'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content")

# plain (the pretraining phase, LLaVA's conv_llava_plain as MGM's preprocess_plain uses it): a
# user turn is reduced to its images, the answer (a caption) follows with "\n" after it, and
# only the answer and that newline are supervised: "<s><image>A red circle.\n". System turns
# are dropped; a user turn without an image is an error (there is nothing to caption).
PLAIN = ("{{ bos_token }}"
         "{% for message in messages %}"
         "{% if message['role'] == 'user' %}"
         "{% if '<image>' not in message['content'] %}"
         "{{ raise_exception('the plain (pretraining) template needs an <image> in every user turn') }}"
         "{% endif %}"
         "{{ '<image>' * message['content'].count('<image>') }}"
         "{% elif message['role'] == 'assistant' %}"
         "{% generation %}{{ message['content'] }}\n{% endgeneration %}"
         "{% elif message['role'] != 'system' %}"
         "{{ raise_exception('role ' + message['role'] + ' where user or assistant was expected') }}"
         "{% endif %}"
         "{% endfor %}")

# name (model.template) -> (chat template, its special tokens, the token that ends an answer
# (None: the tokenizer's eos already does)).
TEMPLATES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "sample": (SAMPLE_CHAT_TEMPLATE, tuple(ROLE_MARKERS.values()), None),
    "vicuna_v1": (VICUNA_V1, (), None),
    "gemma": (GEMMA, ("<start_of_turn>", "<end_of_turn>"), None),
    "llama_3": (LLAMA_3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "llama_3_instruct": (LLAMA_3_INSTRUCT, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    # MGM's --version name for the same layout.
    "chatml_direct": (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    "smollm2": (SMOLLM2, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    # [INST] and [/INST] are plain text to Mixtral's tokenizer, as in MGM's training.
    "mistral_instruct": (MISTRAL_INSTRUCT, (), None),
    "plain": (PLAIN, (), None),
}
