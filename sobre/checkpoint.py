"""Hugging Face checkpoints in and out: config.json + (sharded) safetensors, FP8 block dequantisation; the
names on either side come from names.py.

Loading memory-maps each safetensors file, copies every tensor straight into its (pre-allocated) model
parameter and drops the mapped pages again, so peak memory stays near the model's own size.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import Config
from .fp8 import FP8Experts, FP8Linear, V4QuantExperts, dequantize, dequantize_fp4, ue8m0
from .int8 import int8_scale, quantize_int8, quantize_rows
from .lora import read_adapter
from .manifest import write_manifest
from .model import Rope, Transformer, build_model
from .moe import Gate
from .names import V4_FP32, hf_to_ours, ours_to_hf
from .v4 import FP32, Rope2
from .v4 import Experts as V4Experts

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "F8_E8M0": torch.float8_e8m0fnu}


# ---- reading safetensors ------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; check every tensor lies inside the file. -> ({name: entry}, data start)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = struct.unpack("<Q", raw)[0]
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    for name, e in header.items():
        if e.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
        b, end = e["data_offsets"]
        want = math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
        if end - b != want:
            raise ValueError(f"{path}: tensor {name!r} has {end - b} bytes, its shape {e['shape']} needs {want}")
        if 8 + n + end > size:
            raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {8 + n + end}, "
                             f"file has {size} (re-download or re-save the checkpoint)")
    return header, 8 + n


class SafetensorsFile:
    """One memory-mapped safetensors file. `get` returns a zero-copy view; `release` drops its pages."""

    def __init__(self, path: Path):
        self.path = path
        self.header, self.start = read_header(path)
        self.f = open(path, "rb")
        self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None

    def get(self, name: str) -> torch.Tensor:
        e = self.header[name]
        dtype = DTYPES[e["dtype"]]
        b, end = e["data_offsets"]
        if end == b:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=(end - b) // dtype.itemsize,
                                offset=self.start + b).view(e["shape"])

    def release(self, name: str):
        b, end = self.header[name]["data_offsets"]
        page = mmap.PAGESIZE
        lo = (self.start + b) // page * page
        if end > b:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, self.start + end - lo)

    def close(self):
        if self.mm is not None:
            self.mm.close()
        self.f.close()


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = {name: path / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard named in {index.name} is missing")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return {name: single for name in read_header(single)[0]}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(f"{path}: only pickle weights (*.bin/*.pt) found; sobre loads safetensors only "
                         "(pickles can run code). Convert them with a trusted tool first.")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def fp8_block(hf: dict, source: str) -> tuple[int, int] | None:
    q = hf.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{source}: quantization_config {q} is not supported (only fp8 e4m3 block-scaled)")
    block = tuple(q.get("weight_block_size") or (128, 128))
    if len(block) != 2:
        raise ValueError(f"{source}: quantization_config.weight_block_size must be [rows, cols]")
    return block


def resolve(path: str | os.PathLike) -> Path:
    """A local directory (a sobre run folder: the model it exported, model/), or a Hugging Face Hub id fetched with
    huggingface_hub."""
    p = Path(path)
    if p.is_dir():
        return p / "model" if (p / "model" / "config.json").exists() else p
    if p.exists():
        raise ValueError(f"{p}: expected a model directory (config.json + safetensors), got a file")
    if is_hub_id(path):  # (./x, ../x, /x: paths, never Hub ids)
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.md"]))
        except Exception as e:  # offline, unknown repo, gated model: one clear line, not a traceback
            raise FileNotFoundError(f"{path}: not a local directory, and fetching it from the Hugging Face Hub "
                                    f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    raise FileNotFoundError(f"{path}: no such directory (and not a Hugging Face Hub id like 'org/name')")


def is_hub_id(name) -> bool:
    return bool(re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", str(name)))


def hub_repo(repo: str, private: bool = False) -> str:
    """--push-to-hub's repo, created (or found) before a run trains, so that a missing token or a refused repo
    fails at once and not after the training. -> its id."""
    from huggingface_hub import HfApi, get_token
    if not is_hub_id(repo):
        raise ValueError(f"--push-to-hub expects a Hub repo id like 'org/name', got {repo!r}")
    if get_token() is None:
        raise ValueError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    try:
        return HfApi().create_repo(repo, private=private, exist_ok=True).repo_id
    except Exception as e:  # offline, no write access: one clear line
        raise ValueError(f"--push-to-hub {repo}: the Hub did not create or find it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


def push(run: Path, repo: str) -> str:
    """Upload a run's exported model (run/model: weights, tokenizer, model card, manifest) to the Hub repo, its
    LoRA adapter (run/adapter) into the repo's adapter/ folder. -> the model's commit URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    done = api.upload_folder(repo_id=repo, folder_path=run / "model", commit_message="sobre: the trained model")
    if (run / "adapter").is_dir():
        api.upload_folder(repo_id=repo, folder_path=run / "adapter", path_in_repo="adapter",
                          commit_message="sobre: the LoRA adapter (PEFT format)")
    return done.commit_url


def mtp_tensor(name: str, c: Config) -> bool:
    """Whether a checkpoint tensor belongs to the MTP module: V3's layers past n_layers, V4's `mtp.*`."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(re.match(r"(model\.)?mtp\.", name) or m and int(m.group(1)) >= c.n_layers)


def is_scale(name: str, files) -> bool:
    """Whether a checkpoint tensor is a quantised weight's scale (read with its weight): X.weight_scale_inv as HF
    writes it, or X.scale beside X.weight as DeepSeek-V4 does."""
    return name.endswith(".weight_scale_inv") or (name.endswith(".scale") and name[:-6] + ".weight" in files)


def foreign_mtp_tensor(files: dict, c: Config) -> str | None:
    """The first of the checkpoint's MTP tensors (`files`: checkpoint_files) that maps onto nothing in the MTP
    module `c` builds (another release's MTP layout, e.g. a later model's extra draft heads), or None."""
    with torch.device("meta"):
        ours = set(build_model(c).state_dict())
    for name in files:
        if mtp_tensor(name, c) and not is_scale(name, files):
            try:
                target = hf_to_ours(name, c)
            except KeyError:
                return name
            if target is not None and target[0] not in ours:
                return name
    return None


def kept_fp32(model: Transformer) -> list[torch.Tensor]:
    """The tensors a model of lower precision keeps in fp32 (load casts them back; rollout.CastWeights leaves them):
    every router's weight and bias, as the reference code and transformers route in fp32, and DeepSeek-V4's v4.FP32
    names (its mHC maps, sinks, norms, ...), parameters and buffers."""
    out = [t for m in model.modules() if isinstance(m, Gate) for t in (m.weight, m.bias) if t is not None]
    if model.config.arch == "deepseek_v4":
        out += [t for name, t in [*model.named_parameters(), *model.named_buffers()] if any(k in name for k in FP32)]
    return [t for t in out if t.is_floating_point()]


def load(path, dtype: torch.dtype | None = None, device=None, mtp: bool = True, fp8: bool = False,
         int8: bool = False, adapter=None, int8_skip: tuple[str, ...] = (), **overrides) -> Transformer:
    """Load an HF checkpoint directory (or Hub id) into a sobre Transformer. mtp=False leaves the MTP
    module out (it is only needed for MTP training and speculative decoding; 11.6B params in V3); so does a
    checkpoint without its tensors (as transformers saves DeepSeek models), whatever its config says.
    fp8=True keeps a quantised checkpoint's weights in memory (fp8.FP8Linear / FP8Experts / V4QuantExperts: e4m3
    and V4's FP4 experts) instead of dequantising them on load. int8=True quantises the weights to int8 with
    per-row scales as they are read (int8.quantize_int8: weight-only, for inference; no full-precision copy of
    them is ever held; int8_skip: module names kept as loaded, e.g. ("head",)). adapter: a PEFT LoRA adapter
    folder (or Hub id) merged into the weights as they load (before int8's quantisation)."""
    if fp8 and int8:
        raise ValueError("fp8=True keeps a checkpoint's FP8 weights, int8=True quantises to int8: choose one")
    if fp8 and adapter:
        raise ValueError("an adapter merges into the weights; fp8=True keeps them quantised: load without it")
    path = resolve(path)
    hf = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if hf is None:
        raise FileNotFoundError(f"{path}: no config.json")
    c, files = Config.from_hf(hf, str(path / "config.json")), checkpoint_files(path)
    if c.n_mtp_layers and not any(mtp_tensor(n, c) for n in files):
        c = c.replace(n_mtp_layers=0)  # saved without its MTP module (transformers drops it)
    if c.n_mtp_layers and mtp and (odd := foreign_mtp_tensor(files, c)):
        warnings.warn(f"{path}: MTP tensor {odd!r} fits no MTP module sobre builds for {c.arch}; loading the model "
                      "without its MTP module (only MTP training and speculative decoding need it)", stacklevel=2)
        c = c.replace(n_mtp_layers=0)
    mtp_in_file = c.n_mtp_layers
    c = c.replace(**({} if mtp else {"n_mtp_layers": 0}), **overrides)
    block = fp8_block(hf, str(path / "config.json"))
    if dtype is None:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            hf.get("dtype", hf.get("torch_dtype")), torch.float32)
    v4 = c.arch == "deepseek_v4"
    with torch.device("meta"):
        model = build_model(c)
    model = model.to(dtype).to_empty(device="cpu")
    model.rope = Rope2(c) if v4 else Rope(c)
    if c.tie_embeddings:  # to_empty allocates every parameter afresh, untying them
        if v4:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            model.head.weight = model.embed.weight
    for t in kept_fp32(model):
        t.data = t.data.float()
    if fp8:
        keep_fp8(model, files, block)
    if int8:
        quantize_int8(model, fill=False, skip=int8_skip)  # (the swapped-out weights: allocated, never written)
    deltas = read_adapter(resolve(adapter), c) if adapter else None
    load_weights(model, path, files, block, skip_from=c.n_layers if c.n_mtp_layers < mtp_in_file else None,
                 deltas=deltas)
    if int8 and c.tie_embeddings and "head" not in int8_skip:  # the tied head's own int8 codes
        with torch.no_grad():
            for dst, src in zip((model.head.weight, model.head.scale), quantize_rows(model.embed.weight)):
                dst.copy_(src)
    if device is not None:
        model.to(device)
    return model.eval()


def keep_fp8(model: Transformer, files: dict, block: tuple[int, int] | None):
    """Swap the modules whose checkpoint weights (`files`: checkpoint_files) are quantised for their quantised
    twins (weights filled by load_weights): FP8 linears -> FP8Linear; routed experts -> FP8Experts (V3-style) or
    V4QuantExperts (V4: FP4 codes, int8 with a scale beside them, or e4m3). Anything else (e5m2) loads
    dequantised."""
    quant = {name: e["dtype"] for f in set(files.values()) for name, e in read_header(f)[0].items()
             if e["dtype"] == "F8_E4M3" or e["dtype"] in ("I8", "U8") and scale_name(name, files)}
    c, block = model.config, block or (128, 128)
    for name in sorted(quant):
        target = hf_to_ours(name, c)
        if target is None:
            continue
        ours, expert = target
        path_, _, leaf = ours.rpartition(".")
        mod = model.get_submodule(path_) if expert is None else None
        if isinstance(mod, torch.nn.Linear) and leaf == "weight" and mod.bias is None and quant[name] == "F8_E4M3":
            new = FP8Linear(mod.in_features, mod.out_features, block)
        elif expert is not None and isinstance(old := model.get_submodule(path_), V4Experts):
            E, D, inter = old.down_proj.shape
            new = V4QuantExperts(E, D, inter, old.limit, "fp4" if quant[name] in ("I8", "U8") else "fp8", block)
        elif expert is not None and not isinstance(model.get_submodule(path_), (FP8Experts, V4QuantExperts)):
            E, inter, dim = model.get_submodule(path_).w1.shape
            new = FP8Experts(E, inter, dim, block)
        else:
            continue
        parent, _, child = path_.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def scale_name(name: str, files) -> str | None:
    """A quantised weight's scale in the checkpoint: X.weight_scale_inv (HF) or X.scale (DeepSeek-V4), if any."""
    base = name.removesuffix(".weight")
    return next((n for n in (base + ".weight_scale_inv", base + ".scale") if n in files), None)


def load_weights(model: Transformer, path: Path, files: dict, block: tuple[int, int] | None,
                 skip_from: int | None = None, deltas: dict | None = None):
    """Fill the model's tensors from the checkpoint at `path` (`files`: its checkpoint_files); decoder layers
    >= skip_from (MTP left out) are skipped; deltas {our name: tensor} (lora.read_adapter) are added as they
    arrive."""
    c = model.config
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for ours, d in (deltas or {}).items():
        if ours not in params or tuple(params[ours].shape) != tuple(d.shape):
            raise ValueError(f"the adapter's update of {ours} has shape {tuple(d.shape)}, the model's weight "
                             f"{tuple(params[ours].shape) if ours in params else 'is not loaded'}")
    scales = {n: int8_scale(model, n) for n in params if params[n].dtype == torch.int8}  # int8 codes -> scales
    scales = {n: s for n, s in scales.items() if s}  # (filled as their codes are quantised, not read)
    todo = {}  # our name -> expert indices still to fill (None for plain tensors)
    for name, t in params.items():
        if name.startswith("rope.") or t is None or name in scales.values():
            continue
        todo[name] = set(range(t.shape[0])) if ".experts." in name else None
    if c.tie_embeddings:
        todo.pop("head.weight", None)
        todo.pop("lm_head.weight", None)
    opened: dict[Path, SafetensorsFile] = {}
    halves = set()  # (name, expert, half) of V4's gate_up_proj filled so far

    def dst_dtype(ours):
        return params[ours].dtype if ours in params else None

    def copy(dst, t, what):
        if tuple(t.shape) != tuple(dst.shape):
            raise ValueError(f"{what} has shape {tuple(t.shape)}, the model (from config.json) expects "
                             f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(t)

    def put(ours, expert, t, what):  # copy into a parameter / buffer (or one expert's slice) and tick it off
        if isinstance(expert, tuple):  # V4: w1 / w3 are the halves of an expert's stacked gate_up_proj
            e, half = expert
            copy(params[ours][e].chunk(2, dim=0)[half], t, what)
            halves.add((ours, e, half))
            if (ours, e, 1 - half) in halves:
                tick(ours, e)
            return
        dst = params[ours] if expert is None else params[ours][expert]
        if deltas and ours in deltas:
            t = t.float() + deltas[ours]
        if ours in scales:  # load(int8=True): quantised as it arrives (codes first: their shape is the check)
            t, scale = quantize_rows(t)
            copy(dst, t, what)
            dst = params[scales[ours]] if expert is None else params[scales[ours]][expert]
            t = scale
        copy(dst, t, what)
        tick(ours, expert)

    def tick(ours, expert):
        if expert is None:
            todo.pop(ours, None)
        elif ours in todo:
            todo[ours].discard(expert)
            if not todo[ours]:
                todo.pop(ours)

    def file(f):
        if f not in opened:
            opened[f] = SafetensorsFile(f)
        return opened[f]

    try:
        for name, fpath in sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])):
            if is_scale(name, files):
                continue  # read with its weight
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if skip_from is not None and layer and int(layer.group(1)) >= skip_from:
                continue
            try:
                target = hf_to_ours(name, c)
            except KeyError:
                raise ValueError(f"{fpath}: unexpected tensor {name!r} (not part of a {c.arch} model with "
                                 f"{c.n_layers} layers and {c.n_mtp_layers} MTP layers)") from None
            if target is None or (target[0] in ("head.weight", "lm_head.weight") and c.tie_embeddings):
                continue
            ours, expert = target
            if ours not in params:
                raise ValueError(f"{fpath}: unexpected tensor {name!r} (not part of this {c.arch} model)")
            src = file(fpath)
            if name not in src.header:
                raise ValueError(f"{fpath}: tensor {name!r} listed in the index is not in the file")
            t = src.get(name)
            sname = scale_name(name, files)
            fp4 = t.dtype in (torch.int8, torch.uint8) and sname is not None  # V4's experts: two codes per byte
            if fp4 or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                if sname is None:
                    base = name.removesuffix(".weight")
                    raise ValueError(f"{fpath}: FP8 tensor {name!r} has no {base + '.weight_scale_inv'!r} (or "
                                     f"{base + '.scale'!r})")
                scale = file(files[sname]).get(sname)
                if dst_dtype(ours) == (torch.int8 if fp4 else t.dtype):  # fp8=True: keep it, its scale beside it
                    own = next(n for n in (ours + "_scale_inv", ours + "_scale",
                                           ours.removesuffix("weight") + "scale_inv") if n in params)
                    put(own, expert, ue8m0(scale) if fp4 else scale, f"{fpath}: tensor {sname!r}")
                    t = t.view(dst_dtype(ours))
                else:
                    t = dequantize_fp4(t, scale) if fp4 else dequantize(t, scale, block or (128, 128))
            put(ours, expert, t, f"{fpath}: tensor {name!r}")
            del t
            src.release(name)
    finally:
        for f in opened.values():
            f.close()
    if todo:
        missing = []
        for ours, experts in todo.items():
            missing += [n for n, _ in _hf_names(model, ours, experts)] or [ours]
        raise ValueError(f"{path}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                    if len(missing) > 1 else ""))


def _hf_names(model, ours, experts):
    for hf_name, t in ours_to_hf(model):
        target = hf_to_ours(hf_name, model.config)
        if target and target[0] == ours and (experts is None or target[1] in experts):
            yield hf_name, t


# ---- writing -------------------------------------------------------------------------------------
def save(model: Transformer, path, dtype: torch.dtype | None = None, shard_bytes: int = 4 << 30,
         tokenizer_dir=None, base_model: str = "", about: str = ""):
    """Write an HF directory (config.json, safetensors shards + index, model card) transformers loads, with
    manifest.json (sha256 of every file, config, command, git commit; `sobre verify` checks it). The card names
    base_model (a Hub id goes in its metadata, as the Hub links it) and ends with `about` (markdown)."""
    c = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or next(model.parameters()).dtype
    hf = c.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shards, cur, size = [], {}, 0
    for name, t in ours_to_hf(model):
        keep32 = name.endswith("e_score_correction_bias") or c.arch == "deepseek_v4" and V4_FP32.search(name)
        t = t.detach().to("cpu", torch.float32 if keep32 else dtype if t.is_floating_point() else t.dtype)
        cur[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur or not shards:
        shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = {k: v.clone(memory_format=torch.contiguous_format) for k, v in shard.items()}  # no shared storage
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / f).exists():
                (path / f).write_bytes((Path(tokenizer_dir) / f).read_bytes())
    (path / "README.md").write_text(model_card(model, dtype, base_model) + about)
    write_manifest(path)
    return path


def model_card(model: Transformer, dtype, base_model: str = "") -> str:
    from .stats import model_stats
    c, s = model.config, model_stats(model.config)
    base = f"base_model: {base_model}\n" if is_hub_id(base_model) else ""
    made = f", trained from `{base_model}`" if base_model else ""
    return f"""---
library_name: transformers
license: apache-2.0
{base}tags: [sobre, {c.arch}, {"moe" if c.n_routed_experts else "dense"}]
pipeline_tag: text-generation
---

# {c.arch} model exported by sobre

A `{c.arch}` checkpoint in Hugging Face format written by [sobre](https://github.com/sobre-llm/sobre){made}.
transformers loads it with `AutoModelForCausalLM.from_pretrained(path)`; sobre with `sobre.load(path)`.

| | |
|---|---|
| parameters | {s['params']:,} |
| active parameters / token | {s['active_params']:,} |
| layers | {c.n_layers} (+{c.n_mtp_layers} MTP) |
| hidden size | {c.dim} |
| routed experts | {c.n_routed_experts} (top-{c.n_activated_experts}) |
| context | {c.max_seq_len} |
| dtype | {str(dtype).removeprefix("torch.")} |
"""
