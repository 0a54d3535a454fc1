"""The HTTP side's tokenizer: prompts and chat templates are encoded here, off the step loop.

It wraps a copy of the engine's tokenizer, never the engine's own object (the step loop decodes with that at the
same time): unpickled from the engine process (the default), or deep-copied by engine_thread.py.
"""

from __future__ import annotations

from plait.server.errors import APIError


class ServerTokenizer:
    def __init__(self, tokenizer, vocab_size: int):
        self._tok = tokenizer
        self.vocab_size = vocab_size

    def _require(self, what: str):
        if self._tok is None:
            raise APIError(400, f"this model has no tokenizer, so {what} is not possible: send token ids")
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require("a text prompt").encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", param="tokens")
        return self._require("detokenizing").decode(ids)

    def chat(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        tok = self._require("chat")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
        text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
