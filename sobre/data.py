"""Offline data. Nothing is downloaded.

Built-in corpus: the Python standard library's own source (real text on every machine) interleaved with
procedurally generated reasoning problems (sobre.tasks). User data: .txt, .jsonl ("text" or chat
"messages"), .parquet ("text" column). Documents are tokenised once into memory-mapped uint16/uint32
shards with a manifest; training reads packed windows (documents separated by EOS) in an order fixed by
(seed, step) alone, so any step's batch can be rebuilt: that is what makes resume exact.

Fill in the middle (DeepSeek-V3's pretraining, after DeepSeek-Coder): a share of the training documents
(`fim_rate`, V3's 0.1) is cut at two points drawn uniformly over its characters and written
Prefix-Suffix-Middle, `<｜fim▁begin｜>PREFIX<｜fim▁hole｜>SUFFIX<｜fim▁end｜>MIDDLE` then EOS, so that the model
learns to fill a hole from both sides (served as the completions' `suffix`); the validation split stays plain text.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .tasks import problem_stream

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def stdlib_docs() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(f.relative_to(root).parts):
            continue
        try:
            yield f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def builtin_docs(max_bytes: int = 4 << 20, seed: int = 0, reasoning_share: float = 0.5) -> Iterator[str]:
    """Stdlib source and reasoning problems, interleaved so each makes up its share of the bytes."""
    code, synth = stdlib_docs(), problem_stream(seed)
    total = synth_bytes = 0
    while total < max_bytes:
        doc = next(synth).text() if synth_bytes < reasoning_share * total else next(code, None)
        if doc is None:
            doc = next(synth).text()
        if doc.startswith("Question:"):
            synth_bytes += len(doc.encode())
        total += len(doc.encode())
        yield doc


def file_docs(path: str | Path, tokenizer=None) -> Iterator[str]:
    """Documents of a user file: a .txt is one document per blank-line-separated block of ~paragraphs,
    a .jsonl line is {"text": ...} or {"messages": [...]} (rendered with the chat template)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data file")
    if p.suffix == ".txt":
        text = p.read_text(encoding="utf-8")
        yield from (d for d in text.split("\n\n\n") if d.strip())
    elif p.suffix == ".jsonl":
        from .chat import render
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                yield row["text"]
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                yield (tokenizer.apply_chat_template(row["messages"], add_generation_prompt=False) if tokenizer
                       else render(row["messages"], add_generation_prompt=False))
            else:
                raise ValueError(f"{p}:{n}: expected an object with a 'text' string or a 'messages' list")
    elif p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(p)
        if "text" not in table.column_names:
            raise ValueError(f"{p}: parquet file has no 'text' column (columns: {table.column_names})")
        yield from (t for t in table.column("text").to_pylist() if t)
    else:
        raise ValueError(f"{p}: unsupported data file type {p.suffix!r} (use .txt, .jsonl or .parquet)")


def build(docs: Iterable[str], tokenizer, out: str | Path, val_every: int = 50, shard_tokens: int = 1 << 26,
          batch_docs: int = 256, fim_rate: float = 0.0, seed: int = 0) -> dict:
    """Tokenise documents once into out/{train,val}-NNNNN.bin + manifest.json. A document goes to the
    validation split while that split holds under 1/val_every of the tokens so far (a share of the tokens, not
    of the documents: corpora mix long files and short problems). Each document ends with EOS. fim_rate: the
    share of training documents written fill-in-the-middle (fim_ids; drawn with seed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_token; documents need a separator")
    if fim_rate and tokenizer.fim_ids is None:
        raise ValueError("fill in the middle (--fim-rate) needs the tokenizer's <｜fim▁begin｜>, <｜fim▁hole｜> and "
                         "<｜fim▁end｜> tokens (sobre's tokenizers have them; give --fim-rate 0 otherwise)")
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    splits = {s: {"shards": [], "tokens": 0, "bytes": 0, "docs": 0} for s in ("train", "val")}
    files = {}

    def write(split, ids):
        info = splits[split]
        while ids.size:
            if split not in files or files[split][1] >= shard_tokens:
                name = f"{split}-{len(info['shards']):05d}.bin"
                info["shards"].append({"file": name, "tokens": 0})
                files[split] = [open(out / name, "wb"), 0]
            f, n = files[split]
            take = ids[:shard_tokens - n]
            take.tofile(f)
            files[split][1] += take.size
            info["shards"][-1]["tokens"] += int(take.size)
            info["tokens"] += int(take.size)
            ids = ids[take.size:]

    batch = []

    def flush():
        for text, enc in zip(batch, tokenizer.tok.encode_batch(batch, add_special_tokens=False)):
            short = val_every and splits["val"]["tokens"] * (val_every - 1) < splits["train"]["tokens"]
            split = "val" if short else "train"
            ids = enc.ids
            if split == "train" and fim_rate and rng.random() < fim_rate:
                ids = fim_ids(text, tokenizer, rng)
                splits[split]["fim_docs"] = splits[split].get("fim_docs", 0) + 1
            write(split, np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
            splits[split]["bytes"] += len(text.encode())
            splits[split]["docs"] += 1
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            flush()
    flush()
    for f, _ in files.values():
        f.close()
    manifest = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                **splits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def fim_ids(doc: str, tokenizer, rng: np.random.Generator) -> list[int]:
    """A document as a fill-in-the-middle example, PSM: begin PREFIX hole SUFFIX end MIDDLE (its EOS follows),
    cut at two points drawn uniformly over its characters; each part encoded alone."""
    i, j = sorted(int(k) for k in rng.integers(0, len(doc) + 1, size=2))
    begin, hole, end = tokenizer.fim_ids
    enc = tokenizer.encode
    return [begin, *enc(doc[:i]), hole, *enc(doc[j:]), end, *enc(doc[i:j])]


class Batches:
    """Packed [B, T] (inputs, targets) windows of one split. batch(i) depends only on (seed, i): the
    windows of epoch e are a seeded permutation, and batch i takes the next B of them."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int = 0):
        d = Path(data_dir)
        if not (d / "manifest.json").exists():
            raise FileNotFoundError(f"{d}: no manifest.json (build the dataset first)")
        m = json.loads((d / "manifest.json").read_text())
        self.manifest, self.T, self.B, self.seed = m, seq_len, batch_size, seed
        info = m[split]
        for s in info["shards"]:
            if not (d / s["file"]).exists():
                raise FileNotFoundError(f"{d / s['file']}: shard listed in manifest.json is missing")
        self.shards = [np.memmap(d / s["file"], dtype=m["dtype"], mode="r", shape=(s["tokens"],))
                       for s in info["shards"] if s["tokens"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_windows = (int(self.offsets[-1]) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(f"{d}: the {split} split has {int(self.offsets[-1])} tokens, fewer than one batch of "
                             f"{batch_size} x {seq_len} needs; add data or shrink --batch-size/--seq-len")
        self.bytes_per_token = info["bytes"] / max(info["tokens"], 1)
        self._perm = {}

    def _tokens(self, start: int, end: int) -> np.ndarray:
        parts, pos = [], start
        while pos < end:
            k = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            take = min(end, int(self.offsets[k + 1])) - pos
            parts.append(self.shards[k][pos - self.offsets[k]: pos - self.offsets[k] + take])
            pos += take
        return np.concatenate(parts)

    def window_ids(self, i: int) -> list[int]:
        per_epoch = self.n_windows // self.B
        epoch, j = divmod(i, per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)}
        return self._perm[epoch][j * self.B:(j + 1) * self.B].tolist()

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._tokens(w * self.T, w * self.T + self.T + 1).astype(np.int64) for w in self.window_ids(i)]
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:]

    def sequential(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first n_batches windows in file order (validation)."""
        for i in range(min(n_batches, self.n_windows // self.B)):
            rows = [self._tokens(w * self.T, w * self.T + self.T + 1).astype(np.int64)
                    for w in range(i * self.B, (i + 1) * self.B)]
            xy = torch.from_numpy(np.stack(rows))
            yield xy[:, :-1], xy[:, 1:]
