"""Chat templates (same text as transformers), reasoning split (also streamed), incremental detokenisation,
and `sobre chat` end to end."""

import json
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

import sobre
from sobre.chat import ReasoningStream, render, split_reasoning
from sobre.tokenizer import TextStream, Tokenizer

from conftest import random_model

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}]
LLAMA_LIKE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def toy_tokenizer():
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["héllo wörld, the answer is 42 😀", "<think> reasoning </think> answer"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tok, {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1]})


def test_default_template_is_r1_style():
    assert render(CONVO) == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
                             "<｜User｜>and 3+3?<｜Assistant｜><think>\n")
    assert render(CONVO, thinking=False).endswith("<｜Assistant｜>")
    with pytest.raises(ValueError, match="unknown role tool"):
        render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        render([{"role": "user"}])


@pytest.mark.parametrize("template", [None, LLAMA_LIKE])
def test_templates_render_like_transformers(template):
    from transformers import PreTrainedTokenizerFast
    tok = toy_tokenizer()
    tok.chat_template = template
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                 chat_template=template or sobre.chat.DEFAULT_TEMPLATE)
    want = hf.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True, thinking=True)
    assert tok.apply_chat_template(CONVO) == want


@pytest.mark.parametrize("text,started,want", [
    ("<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer")),
    ("plan</think>answer", True, ("plan", "answer")),
    ("still thinking", True, ("still thinking", "")),
    ("just an answer", False, ("", "just an answer")),
    ("<think>a</think>b</think>c", False, ("a", "b</think>c")),
])
def test_split_reasoning(text, started, want):
    assert split_reasoning(text, started) == want
    for step in (1, 2, 3, 7):  # the streaming splitter agrees, however the text is cut
        rs, r, c = ReasoningStream(started), "", ""
        for i in range(0, len(text), step):
            dr, dc = rs.feed(text[i:i + step])
            r, c = r + dr, c + dc
        dr, dc = rs.flush()
        assert ((r + dr).strip(), (c + dc).strip()) == want


def test_text_stream_holds_back_partial_utf8():
    tok = toy_tokenizer()
    ids = tok.encode("héllo wörld 😀 ok")
    stream = TextStream(tok)
    pieces = [stream.feed(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == "héllo wörld 😀 ok"
    assert all("\ufffd" not in p for p in pieces)
    stream = TextStream(tok)  # a stream cut inside a character ends with U+FFFD, as decode does
    cut = ids[:-1] if tok.decode(ids[:-1]).endswith("\ufffd") else ids[:-2]
    assert "".join(stream.feed(i) for i in cut) + stream.flush() == tok.decode(cut)


def test_text_stream_keeps_think_tags_drops_eos():
    tok = toy_tokenizer()
    ids = tok.encode("<think> reasoning </think> answer") + [tok.eos_id]
    stream = TextStream(tok)
    text = "".join(stream.feed(i) for i in ids)
    assert text == "<think> reasoning </think> answer"
    assert split_reasoning(text, False) == ("reasoning", "answer")


def test_sobre_chat_end_to_end(tmp_path):
    tok = toy_tokenizer()
    path = sobre.save(random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=1)),
                      tmp_path / "m")
    tok.tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tok.config))
    out = subprocess.run([sys.executable, "-m", "sobre", "chat", str(path), "--max-new-tokens", "12",
                          "--temperature", "0"], input="hello\n/think\nagain\n/reset\n/exit\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">") >= 3 and "/reset" in out.stderr
