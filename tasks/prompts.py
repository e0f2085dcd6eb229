"""Turn (instruction, question) into the exact prompt string a policy sees, via its own chat template.

Using the tokenizer's template (not a hand-rolled format) means DeepSeek-R1-Distill-Qwen gets its own
`<｜User｜>...<｜Assistant｜><think>\n` prefix, and the tiny model gets its compact `<|user|>...<|assistant|>`;
the warm start and the RL rollouts call this same function, so the two cannot drift apart.
"""
from __future__ import annotations


def user_message(instruction: str, question: str) -> str:
    """The user turn: instruction, a blank line, then the question (just the question if no instruction)."""
    return f"{instruction}\n\n{question}" if instruction else question


def format_prompt(tokenizer, instruction: str, question: str) -> str:
    """The chat-formatted prompt (a string, special tokens inline) ending where the reply starts.

    tokenizer: any HF tokenizer with a `chat_template`; raises ValueError naming the tokenizer if it has
    none (a base model without a template would otherwise get a silently different format).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(f"tokenizer {name!r} has no chat_template; klrl formats prompts with the model's "
                         "own template (set tokenizer.chat_template in its tokenizer_config.json)")
    messages = [{"role": "user", "content": user_message(instruction, question)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def resolve_instruction(configured: str, task_default: str) -> str:
    """TaskConfig.instruction, or the task's default when it is ''."""
    return configured if configured else task_default
