"""format_prompt goes through the tokenizer's own chat template (tiny tokenizer and a Qwen-style one)."""
from __future__ import annotations

import pytest

from core.config import TaskConfig, TinyModelConfig
from tasks import make_task
from tasks.prompts import format_prompt, resolve_instruction, user_message
from tasks.tiny_model import build_tokenizer

# A hand-written template in the style of Qwen2.5 / DeepSeek-R1-Distill-Qwen (which opens the reply
# with <think>), so the test needs no hub download.
QWEN_STYLE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer()


def test_tiny_template_compact_palindrome_prompt(tiny_tokenizer):
    prompt = format_prompt(tiny_tokenizer, "", "aabbc")
    assert prompt == "<|user|>aabbc<|end|><|assistant|>"
    ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 5 + 2  # role token, one token per letter, end + assistant tokens


def test_instruction_precedes_question(tiny_tokenizer):
    prompt = format_prompt(tiny_tokenizer, "Solve it.", "1+1?")
    assert prompt == "<|user|>Solve it.\n\n1+1?<|end|><|assistant|>"
    assert user_message("", "q") == "q"


def test_qwen_style_template_is_used(tiny_tokenizer):
    tok = build_tokenizer()
    tok.chat_template = QWEN_STYLE_TEMPLATE
    prompt = format_prompt(tok, "Think.", "What is 2+2?")
    assert prompt == "<|im_start|>user\nThink.\n\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_missing_chat_template_is_a_clear_error():
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        format_prompt(tok, "", "q")


def test_configured_instruction_overrides_task_default():
    task = make_task(TaskConfig(train_size=8, eval_size=2, compact_prompt=False))
    assert resolve_instruction("", task.default_instruction) == task.default_instruction
    assert resolve_instruction("Be brief.", task.default_instruction) == "Be brief."


def test_answer_tags_are_single_tokens_and_survive_decoding(tiny_tokenizer):
    ids = tiny_tokenizer("<answer>abba</answer><|end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 4 + 1 + 1
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<answer>abba</answer>"


def test_tokenizer_round_trips_any_text(tiny_tokenizer):
    text = "x = \\frac{1}{2}\n  é ∑ {}"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(tiny_tokenizer) == len(set(tiny_tokenizer.get_vocab().values()))
    assert TinyModelConfig().hidden_size % TinyModelConfig().num_heads == 0
