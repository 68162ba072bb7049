"""Tokenizers through HF `tokenizers`: tokenizer.json + tokenizer_config.json (special tokens, chat template)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat import DEFAULT_TEMPLATE, render

# DeepSeek's special tokens (the fullwidth bars and U+2581 are part of the names)
SPECIAL = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
           "pad_token": "<｜▁pad▁｜>", "user": "<｜User｜>", "assistant": "<｜Assistant｜>",
           "think": "<think>", "end_think": "</think>",
           "fim_begin": "<｜fim▁begin｜>", "fim_hole": "<｜fim▁hole｜>", "fim_end": "<｜fim▁end｜>",
           "tool_calls_begin": "<｜tool▁calls▁begin｜>", "tool_calls_end": "<｜tool▁calls▁end｜>",
           "tool_call_begin": "<｜tool▁call▁begin｜>", "tool_call_end": "<｜tool▁call▁end｜>",
           "tool_sep": "<｜tool▁sep｜>",
           "tool_output_begin": "<｜tool▁output▁begin｜>", "tool_output_end": "<｜tool▁output▁end｜>"}
FIM = (SPECIAL["fim_begin"], SPECIAL["fim_hole"], SPECIAL["fim_end"])  # fill in the middle, PSM: begin PREFIX hole
#   SUFFIX end MIDDLE (DeepSeek-Coder's and V3's tokens and order)


def _content(t):
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self.tok, self.config = tok, config or {}
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = _content(self.config.get("pad_token"))
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None else (self.eos_id or 0)
        template = chat_template or self.config.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template  # None -> sobre's DeepSeek-R1-style default

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """DeepSeek's fill-in-the-middle tokens (begin, hole, end), or None where the vocabulary lacks one."""
        ids = tuple(self.tok.token_to_id(t) for t in FIM)
        return None if None in ids else ids

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """The ids of a fill-in-the-middle prompt, PSM (the model writes the middle, then end-of-sentence):
        the tokenizer's own specials (begin-of-sentence), then begin PREFIX hole SUFFIX end."""
        if self.fim_ids is None:
            raise ValueError(f"the model's tokenizer has no fill-in-the-middle tokens ({', '.join(FIM)})")
        return self.encode(FIM[0] + prefix + FIM[1] + suffix + FIM[2], add_special_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. add_special_tokens: also what tokenizer.json's post-processor adds (DeepSeek's
        checkpoints: begin-of-sentence first; sobre's tokenizers: nothing), as transformers' tokenizer(text)
        and vLLM's text prompts. Chat prompts are rendered with their special tokens and encoded without."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, out):
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja when it has its own template)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template and self.chat_template != self.config.get("chat_template"):
            (out / "chat_template.jinja").write_text(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            thinking: bool = True, **extra) -> str:
        """extra: more template variables, e.g. tools (OpenAI's function schemas), as transformers passes them."""
        kw = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v}
        return render(messages, self.chat_template, add_generation_prompt, thinking=thinking, **kw | extra)


def framing_ids(tokenizer) -> set[int]:
    """Begin/end-of-sentence and padding ids: what streamed text leaves out (any object with those attributes)."""
    return {getattr(tokenizer, name, None) for name in ("bos_id", "eos_id", "pad_id")} - {None}


class TextStream:
    """Incremental detokenisation with the tokenizers library's DecodeStream (each token decodes against a few
    before it, not the whole text again): feed token ids, get the new text; a trailing partial UTF-8 character
    is held back until the next token completes it. Begin/end-of-sentence and padding tokens are dropped, every
    other special token is kept: `<think>`/`</think>` carry the reasoning split."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], 0
        self.drop = framing_ids(tokenizer)
        self.decoder = decoders.DecodeStream(skip_special_tokens=False)

    def feed(self, token: int) -> str:
        if token in self.drop:
            return ""
        self.ids.append(token)
        delta = self.decoder.step(self.tok.tok, token) or ""
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        """The held-back rest at the end of a stream (invalid bytes come out as U+FFFD, as in decode)."""
        text = self.tok.decode(self.ids)
        delta, self.sent = text[self.sent:], len(text)
        return delta


def load_tokenizer(path) -> Tokenizer | None:
    """Tokenizer of a model directory, or None when it has no tokenizer.json."""
    p = Path(path)
    if not (p / "tokenizer.json").exists():
        return None
    cfg = p / "tokenizer_config.json"
    config = json.loads(cfg.read_text()) if cfg.exists() else {}
    jinja = p / "chat_template.jinja"
    template = jinja.read_text() if jinja.exists() else None
    return Tokenizer(HFTokenizer.from_file(str(p / "tokenizer.json")), config, template)


def train_tokenizer(texts, vocab_size: int = 4096, out: str | Path | None = None,
                    max_len: int = 4096) -> Tokenizer:
    """Byte-level BPE (digits split one by one, as DeepSeek's) with DeepSeek's special tokens and the R1-style
    chat template. Writes tokenizer.json + tokenizer_config.json (transformers' AutoTokenizer loads them)."""
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL)
    if vocab_size < floor:  # (the trainer would return the alphabet alone, silently larger than asked)
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes and {len(SPECIAL)} special tokens every "
                         f"byte-level BPE holds: at least {floor}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    config = {"bos_token": SPECIAL["bos_token"], "eos_token": SPECIAL["eos_token"], "pad_token": SPECIAL["pad_token"],
              "chat_template": DEFAULT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": max_len, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return Tokenizer(tok, config)


def bytes_per_token(tok: Tokenizer, texts) -> float:
    n_bytes = n_tokens = 0
    for t in texts:
        n_bytes += len(t.encode())
        n_tokens += len(tok.encode(t))
    return n_bytes / max(n_tokens, 1)


def eos_ids(config, tokenizer=None) -> tuple[int, ...]:
    """End-of-sequence ids: the config's (one id or a list) and the tokenizer's, each once."""
    eos = config.eos_token_id
    ids = (list(eos) if isinstance(eos, list) else [eos]) + [getattr(tokenizer, "eos_id", None)]
    return tuple(dict.fromkeys(t for t in ids if t is not None))
