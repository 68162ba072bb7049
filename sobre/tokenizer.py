"""Tokenizers through HF `tokenizers`: tokenizer.json + tokenizer_config.json (special tokens, chat template)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None):
        self.tok, self.config = tok, config or {}
        self.bos_id = self._special("bos_token")
        self.eos_id = self._special("eos_token")

    def _special(self, key):
        t = self.config.get(key)
        if isinstance(t, dict):
            t = t.get("content")
        return self.tok.token_to_id(t) if t else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)


def load_tokenizer(path) -> Tokenizer | None:
    """Tokenizer of a model directory, or None when it has no tokenizer.json."""
    p = Path(path)
    if not (p / "tokenizer.json").exists():
        return None
    cfg = p / "tokenizer_config.json"
    config = json.loads(cfg.read_text()) if cfg.exists() else {}
    return Tokenizer(HFTokenizer.from_file(str(p / "tokenizer.json")), config)
