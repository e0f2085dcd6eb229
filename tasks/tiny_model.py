"""Build the tiny random-init Qwen2 policy and its character-level tokenizer (no hub download, ever).

`build_tiny_model(cfg, out_dir)` writes a HF folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json) that both
`AutoModelForCausalLM.from_pretrained` and vLLM (`LLM(model=out_dir, dtype="float32")`) load.

Size (defaults: hidden 128, 4 layers, 4 heads / 2 kv heads, MLP 384, vocab 266): 856,704 parameters,
3.4 MB in float32. Why this size: a warm-start step (32 sequences x ~16 tokens) is ~6 * 0.86M * 512
~ 2.6 GFLOP, ~0.1 s on one free core, so several hundred steps fit the ~3-minute budget even on the
shared 2-core machine, and an RL step stays dominated by orchestration rather than math; yet 4
attention layers are enough to pick an order of the letter pairs and mirror it (the palindrome task).
head_dim 32 is one vLLM's CPU attention supports.

Tokenizer: one token per byte (a byte-level BPE with no merges, so every ASCII character is its own
token and any UTF-8 text round-trips). Chat-control tokens are
special (dropped by `decode(skip_special_tokens=True)`); `<answer>`/`</answer>`/`<think>`/`</think>`
are ordinary added tokens: single ids that keep responses short yet survive decoding, because the
reward reads them.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.config import TinyModelConfig

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TAG_TOKENS = ("<answer>", "</answer>", "<think>", "</think>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# The tiny model's own chat template: <|role|>content<|end|> per message, then <|assistant|> to
# prompt a reply. No role names as characters and no bos, so a compact prompt is ~10-20 tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what ByteLevel pre-tokenizes to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer():
    """A deterministic one-token-per-byte `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`).

    Why Qwen2Tokenizer rather than a bare tokenizers pipeline: transformers 5 forces
    `AutoTokenizer` to rebuild any `model_type == "qwen2"` tokenizer as Qwen2Tokenizer (byte-level
    pre-tokenizer), which would silently drop characters of a plain character vocabulary. A
    byte-level BPE with no merges is character-level for ASCII and loads identically whichever class
    (AutoTokenizer, PreTrainedTokenizerFast, vLLM) reads tokenizer.json. Ids: specials, tags, bytes.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *TAG_TOKENS, *byte_alphabet()))}
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[], bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=list(ROLE_TOKENS), padding_side="left", clean_up_tokenization_spaces=False,
    )
    # Ordinary (non-special) added tokens: one id each, kept by decode(skip_special_tokens=True).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 10**6  # the model's own limit lives in config.max_position_embeddings
    return tok


def build_config(cfg: TinyModelConfig, tokenizer):
    """The Qwen2Config for `cfg`; untied embeddings so every tensor has one name for weight sync."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Qwen2ForCausalLM"],
        dtype="float32",
    )


def build_tiny_model(cfg: TinyModelConfig, out_dir: str | Path) -> Path:
    """Write an untrained (seeded random-init) tiny Qwen2 + tokenizer to `out_dir`; returns the folder.

    Deterministic: the same `cfg` (its `seed` included) gives the same weights and tokenizer.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(folder: str | Path) -> int:
    """Number of parameters stored in a saved model folder (reads config-built model, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def describe(folder: str | Path) -> dict:
    """A small JSON-able summary of a tiny model folder (for logs and warm_start.json)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    return {k: config[k] for k in keys} | {"parameters": count_parameters(folder)}
