"""The command line's shared pieces: argparse types that turn a bad number into one usage line naming the flag
(never a traceback after a model has loaded), dtype names, and the flag sets several verbs share."""

from __future__ import annotations

import argparse
import inspect
import io
import textwrap
import tokenize

import torch

from .sampling import GENERATION_KEYS, SamplingParams, generation_defaults

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_HELP = "default: the checkpoint's; on CPU float32 below 100M active parameters or without native bf16"


def at_least(lo: int):
    """argparse type: an int >= lo (a bad flag is one usage line naming it, never a traceback later)."""
    def parse(text: str) -> int:
        n = int(text)
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    parse.__name__ = "integer"  # (argparse's message for text that is no int: "invalid integer value")
    return parse


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    x = float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def port(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {n}")
    return n


def lora_module(text: str) -> tuple[str, str]:
    """argparse type: NAME=DIR (vLLM's --lora-modules) -> (name, folder or Hub id)."""
    name, eq, path = text.partition("=")
    if not (eq and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (an adapter's name and its folder), got {text!r}")
    return name, path


def token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None


FP8_HELP = "keep a quantised checkpoint's weights in memory (FP8 e4m3, V4's FP4 experts)"
INT8_HELP = ("quantise the weights to int8 on load (weight-only, a scale per row: a quarter of fp32's bytes; "
             "on CPU decode 2.2-2.5x fp32)")
ADAPTER_HELP = "a PEFT LoRA adapter folder (or Hub id) for the model, merged into its weights as they load"
REWARD_HELP = ("module:function scoring the task's completions, fn(completion, answer) -> float (default: a .jsonl "
               "task's answer match, a built-in task's own check)")


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto (the GPU when torch sees one, else the CPU), cpu, "
                        "cuda, cuda:N or mps")


def add_sampling_flags(parser, **builtin):
    """--temperature --top-k --top-p --min-p --repetition-penalty, each unset by default: sampling_args resolves
    them (builtin: the verb's own defaults, where the checkpoint sets none)."""
    for key in GENERATION_KEYS:
        default = builtin.get(key, getattr(SamplingParams, key))
        parser.add_argument("--" + key.replace("_", "-"), type=type(default), default=None,
                            help=f"default: the checkpoint's generation_config.json, else {default}"
                            + (" (0: greedy)" if key == "temperature" else ""))


def sampling_args(args, path, **builtin) -> dict:
    """Each sampling value: the flag when given, else the checkpoint's generation_config.json (as transformers
    and vLLM), else the verb's builtin one (absent: SamplingParams' default)."""
    gen = generation_defaults(path)
    out = {k: gen.get(k, builtin.get(k)) if getattr(args, k) is None else getattr(args, k) for k in GENERATION_KEYS}
    return {k: v for k, v in out.items() if v is not None}


def add_decode_flags(parser):
    """The engine's decode options and its weights' dtype, shared by generate, chat and serve."""
    parser.add_argument("--speculative", nargs="?", const=True, default=False, type=int, metavar="K",
                        help="MTP speculative decoding, K draft tokens a step (default: one per MTP layer)")
    parser.add_argument("--min-acceptance", type=float, default=0.3, metavar="A",
                        help="speculative: a sequence whose drafts were accepted less often than A over 32+ "
                        "verifies decodes plainly from then on (0: always draft)")
    parser.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                        help="speculative: the MTP drafts' head over the first N token ids (default: a quarter of "
                        "the vocabulary, at least 1024; the vocabulary's size: all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step, weights frozen in: "
                        "1-5 minutes of compiling, then faster decode of up to experts / top-k sequences")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=DTYPE_HELP)
    parser.add_argument("--fp8", action="store_true", help=FP8_HELP)
    parser.add_argument("--int8", action="store_true", help=INT8_HELP)
    parser.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)


def add_dataclass_flags(parser, cls):
    """One flag per field of a config dataclass (--save-every for save_every), typed by its default, its help the
    field's comments (field_help)."""
    helps = field_help(cls)
    for name, f in cls.__dataclass_fields__.items():
        flag, about = "--" + name.replace("_", "-"), helps.get(name, "").replace("%", "%%")  # (argparse's %)
        if isinstance(f.default, bool):  # (on by default: --no-FLAG turns it off)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction if f.default else "store_true",
                                default=f.default, help=about or None)
        elif isinstance(f.default, tuple):  # (tuple[float, float]: two floats; tuple[str, ...]: any number)
            kind = type(f.default[0]) if f.default else {"float": float, "int": int}.get(
                str(f.type).removeprefix("tuple[").split(",")[0].strip(), str)  # (an empty default: the annotation's)
            n = "*" if "..." in str(f.type) or not f.default else len(f.default)
            parser.add_argument(flag, nargs=n, type=kind, default=f.default, metavar=kind.__name__.upper(),
                                help=f"{about} (default: {' '.join(map(str, f.default)) or 'none'})")
        else:
            default = f"(default: {f.default})" if f.default != "" else "(default: none)"
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                metavar=type(f.default).__name__.upper(), help=f"{about} {default}".lstrip())


def field_help(cls) -> dict[str, str]:
    """Each field of a config dataclass as its comments in its class's source say it, for its flag's help: the
    comment lines right above the field, the comment ending its line, and the `#   ` lines that continue that (one
    source of truth: the dataclass). A subclass's field takes its own; a field without comments gets none."""
    helps: dict[str, str] = {}
    for klass in cls.__mro__[::-1]:
        if "__dataclass_fields__" not in vars(klass):
            continue
        fields = vars(klass).get("__annotations__", {})
        try:
            source = textwrap.dedent(inspect.getsource(klass))  # (a class defined in a function: indented)
        except (OSError, TypeError):  # (no source at hand: the flags go without help)
            continue
        depth, above, field, last, line_start = 0, [], None, None, True
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            kind, text = tok.type, tok.string
            if kind == tokenize.INDENT:
                depth += 1
            elif kind == tokenize.DEDENT:
                depth -= 1
            elif kind == tokenize.COMMENT:
                note = text.lstrip("#").strip()
                if field:  # the comment ending the field's line
                    above.append(note)
                elif line_start and last and text.startswith("#   "):  # continuing the last field's
                    helps[last] = f"{helps[last]} {note}".strip()
                elif line_start:
                    above.append(note)
                    last = None
            elif kind == tokenize.NEWLINE:  # a statement ends: a field's help is what was gathered for it
                if field:
                    helps[field] = " ".join(above)
                last, field, above, line_start = field, None, [], True
            elif kind != tokenize.NL:
                if line_start and depth == 1 and kind == tokenize.NAME and text in fields:
                    field = text
                line_start = False
    return helps


def dataclass_argv(a) -> list[str]:
    """The command-line flags that give back the config dataclass `a` (the inverse of add_dataclass_flags)."""
    argv = []
    for name in a.__dataclass_fields__:
        v, flag = getattr(a, name), "--" + name.replace("_", "-")
        if isinstance(v, bool) and v != a.__dataclass_fields__[name].default:  # store_true, or --no-FLAG
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, tuple) and v:  # nargs="*"
            argv += [flag, *map(str, v)]
        elif not isinstance(v, (bool, tuple)):
            argv += [flag, str(v)]
    return argv
