"""One small tokenizer protocol for the evaluation suite.

Generators need two things from a tokenizer: ``encode(text) -> list[int]`` without special tokens
(to measure and cut prompts) and ``decode(ids) -> str``. Accepted inputs:

- a Hugging Face tokenizer (``PreTrainedTokenizer[Fast]``), the common case;
- a raw ``tokenizers.Tokenizer``;
- a path or model name string, loaded with ``transformers.AutoTokenizer`` (local files only here);
- anything that already has ``encode``/``decode`` with those meanings.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _HFAdapter:
    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @property
    def chat_template(self):
        return getattr(self.tok, "chat_template", None)


class _RawTokenizersAdapter:
    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def as_tokenizer(tok: Any) -> TokenizerLike:
    """Wrap ``tok`` so that ``encode`` never adds special tokens and ``decode`` skips them."""
    if isinstance(tok, (_HFAdapter, _RawTokenizersAdapter)):
        return tok
    if isinstance(tok, str):
        from transformers import AutoTokenizer

        return _HFAdapter(AutoTokenizer.from_pretrained(tok))
    try:  # raw `tokenizers.Tokenizer`: encode() returns an Encoding object
        import tokenizers

        if isinstance(tok, tokenizers.Tokenizer):
            return _RawTokenizersAdapter(tok)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(tok, "encode") and hasattr(tok, "decode"):
        if hasattr(tok, "apply_chat_template") or hasattr(tok, "pad_token_id"):
            return _HFAdapter(tok)
        return tok
    raise TypeError(f"not a tokenizer: {type(tok).__name__}")


def count_tokens(tok: TokenizerLike, text: str) -> int:
    return len(tok.encode(text))


def chat_template_tokens(tok: Any) -> int:
    """Tokens the chat template wraps around an empty user turn (a HF tokenizer): what a prompt
    generator reserves so that template + prompt fit the requested length."""
    text = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


def parse_length(text: str) -> int:
    """A token length from the command line: '4k' (case-insensitive) -> 4096, '3000' -> 3000."""
    text = text.strip()
    return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)
