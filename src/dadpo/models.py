"""Load any model spec (alias, hub id, local directory, .gguf file) as model + tokenizer with a chat template.

GGUF files are dequantized once into a cached safetensors directory (`$DADPO_CACHE`, default
`~/.cache/dadpo`), so every later load is a plain, fast `from_pretrained` of that directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from dadpo.embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from dadpo.errors import DadpoError
from dadpo.io import atomic_write_json, load_json_object

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models live: `$DADPO_CACHE`, else `$XDG_CACHE_HOME/dadpo`, else `~/.cache/dadpo`."""
    if os.environ.get("DADPO_CACHE"):
        return Path(os.environ["DADPO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "dadpo"


def embedded_gguf(alias: str) -> Path:
    """Locate an embedded model's GGUF inside its wheel without importing the package."""
    dist_name, rel_path, install = EMBEDDED_MODELS[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DadpoError(f"model {alias!r} needs the {dist_name} wheel: run `{install}`") from None
    path = Path(dist.locate_file(rel_path))
    if not path.is_file():
        raise DadpoError(f"model {alias!r}: {path} is missing from {dist_name}; reinstall with `{install}`")
    return path


def resolve_model(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` takes: a local directory or a hub id."""
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise DadpoError(f"model file not found: {spec}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DadpoError(f"model directory {spec} has no config.json")
        _check_config(path, spec)
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise DadpoError(f"model not found: {spec} (expected a directory with config.json or a .gguf file)")
    if spec.count("/") == 1 and all(spec.split("/")):
        return spec  # a hub id: transformers fetches it (or finds it in the HF cache)
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise DadpoError(f"unknown model spec {spec!r}: give a hub id (org/name), a local directory, a .gguf file, "
                     f"or one of: {known}")


def register_own_model_types(path: str) -> None:
    """Register dadpo's model types (`dadpo_pruned_<family>`) with transformers' Auto classes when the
    model at `path` may be one: a local folder whose config.json names such a type, or anything whose
    config is not local (a hub id). Stock model types skip it: the registering module imports three
    families' modelling code, most of a cold process's model load."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # unreadable: loading reports it
        if isinstance(model_type, str) and not model_type.startswith("dadpo_pruned_"):
            return
    import dadpo.modeling_dadpo_pruned  # noqa: F401


def _check_config(path: Path, spec: str) -> None:
    """Fail with one line, before any weights load or any output is written, on a model folder whose
    config.json transformers cannot use: not JSON, a model_type it does not know, fields of the wrong type.
    A folder whose config class is its own code (`auto_map.AutoConfig`) is left to loading, where
    --trust-remote-code decides."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = load_json_object(path / "config.json", f"model {spec}")
    register_own_model_types(str(path))
    if isinstance(raw.get("auto_map"), dict) and isinstance(raw["auto_map"].get("AutoConfig"), str) \
            and raw.get("model_type") not in CONFIG_MAPPING:  # dadpo's own folders carry code it already has
        return  # the folder's own config code: loading it needs --trust-remote-code, and checks it then
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=False)  # refuse other code, without asking on stdin
    except (OSError, ValueError, TypeError, StrictDataclassError) as e:  # unknown model_type, fields of wrong type
        raise DadpoError(f"model {spec}: config.json is not usable ({_first_line(e)})") from None


#: files `from_pretrained` may read from a model directory (weights, configs, tokenizer, remote code)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".jinja", ".py", ".tiktoken")


def file_digest(path: Path) -> str:
    """SHA-256 of every byte of `path`, computed once per version of the file.

    The digest is remembered in `<cache>/file-digests.json` under the resolved path together with the file's
    size, mtime_ns, ctime_ns and inode; while those stay the same, a later call only stats the file. Any
    write or replacement changes one of them (ctime cannot be set back by hand), so the file is hashed again.
    """
    path = path.resolve()
    st = path.stat()
    version = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    index_path = cache_root() / "file-digests.json"
    index = _read_digest_index(index_path)
    known = index.get(str(path))
    if isinstance(known, dict) and known.get("version") == version:
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    index[str(path)] = {"version": version, "sha256": h.hexdigest()}
    try:
        atomic_write_json(index_path, index)
    except OSError as e:  # a read-only cache: correct still, only hashed again next time
        log.debug("cannot remember the digest of %s in %s: %s", path, index_path, e)
    return h.hexdigest()


def _read_digest_index(path: Path) -> dict:
    """The remembered digests; a missing or damaged index is only a cache, so it reads as empty."""
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


def model_fingerprint(spec: str) -> str:
    """What a model spec stands for, for cache keys: changes whenever the weights behind the spec change.

    - an alias or a `.gguf` file: `sha256:` + the GGUF's content hash (see `file_digest`);
    - a local directory: `stat:` + a hash of the name, size, mtime_ns and inode of each file
      `from_pretrained` may read (`MODEL_FILE_SUFFIXES`). Stat-based, so it stays cheap for GB of weights:
      any rewrite of a file (save_pretrained, a prune again in place) gives it a new mtime or inode;
    - anything else (a hub id, or a spec that names nothing here): the spec itself.
    """
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        return "sha256:" + file_digest(embedded_gguf(spec))[:16]
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") and path.is_file():
        return "sha256:" + file_digest(path)[:16]
    if path.is_dir():
        return "stat:" + _dir_fingerprint(path)
    return spec


def model_stamp(spec: str) -> str:
    """A readable model identity for stamping cached outputs (answer rows, metric keys): the spec, plus
    `@<fingerprint>` unless the spec is its own fingerprint (a hub id), so outputs of the weights a folder
    held before it was pruned again in place no longer match."""
    fingerprint = model_fingerprint(spec)
    return str(spec) if fingerprint == str(spec) else f"{spec}@{fingerprint}"


def _dir_fingerprint(path: Path) -> str:
    stats = []
    for p in sorted(path.iterdir()):
        if p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith(".") and p.is_file():
            st = p.stat()  # follows symlinks: a linked-in model is fingerprinted by its real files
            stats.append([p.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _gguf_cache_dir(gguf: Path) -> Path:
    """The conversion's folder, named by the GGUF's full content hash: a changed file is converted anew."""
    return cache_root() / "gguf" / f"{gguf.stem}-{file_digest(gguf)[:16]}"


def check_gguf(gguf: Path) -> None:
    """Fail with one line unless `gguf` is a whole GGUF file: it starts with the GGUF magic bytes, its header
    parses (with the reader transformers converts with) and the file is long enough for every tensor the
    header lists. Cheap (the header only, memory-mapped), so it runs before the file is hashed or converted:
    a garbage or truncated file leaves nothing in the cache."""
    from transformers.integrations.gguf.reader import GgufHeader

    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DadpoError(f"model file {gguf}: cannot read it ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise DadpoError(f"model file {gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        header = GgufHeader.from_file(str(gguf))
    except (ValueError, struct.error, OverflowError) as e:  # the reader's words for a damaged or cut header
        raise DadpoError(f"model file {gguf}: its GGUF header is damaged or cut short ({_first_line(e)})") from None
    if not header.tensors:
        raise DadpoError(f"model file {gguf} holds no tensors; it is not a model")
    need = max(header.data_start + t.offset + t.nbytes for t in header.tensors)
    size = gguf.stat().st_size
    if size < need:
        raise DadpoError(f"model file {gguf} is truncated: {size} bytes, but its header lists tensors up to byte "
                         f"{need}")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into `<cache>/gguf/<name>-<hash>/` once (safetensors + tokenizer); return that dir."""
    check_gguf(gguf)
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    t0 = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o755)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                               output_loading_info=True)
        except (ValueError, KeyError) as e:  # an architecture or metadata transformers cannot map
            why = f"its metadata lacks {e}" if isinstance(e, KeyError) else _first_line(e)
            raise DadpoError(f"model file {gguf} cannot be converted: {why}") from None
        if info["missing_keys"]:  # weights the file lacks would be left randomly initialised: never use those
            missing = sorted(info["missing_keys"])
            raise DadpoError(f"model file {gguf} lacks {len(missing)} weights its architecture needs "
                             f"(e.g. {missing[0]}); it is damaged or not a complete model")
        # A GGUF-loaded model refuses save_pretrained until its (dequantized) quantization state is dropped.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        _fix_chat_eos(model, tok)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1fs", time.time() - t0)
    return target


def _fix_chat_eos(model, tok) -> None:
    """Make generation stop at the chat template's end-of-turn token."""
    end = chat_end_token_ids(tok)
    if end:
        model.generation_config.eos_token_id = end if len(end) > 1 else end[0]
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id


CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


def chat_end_token_ids(tok) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus known chat end-of-turn markers."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in CHAT_END_TOKENS if t in vocab]
    return sorted(set(ids))


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    """Tokenizer only (cheap), padded on the left for batched generation."""
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # missing or unreadable tokenizer files
        raise DadpoError(f"cannot load tokenizer for {spec!r}: {_first_line(e)}") from None
    if tok.chat_template is None:
        raise DadpoError(f"tokenizer of {spec!r} has no chat template; dadpo works with chat models")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: str | None = None,
):
    """Load (model, tokenizer) for a spec; the model is in eval mode on `device` (default: cuda if present)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise DadpoError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = resolve_model(spec)
    register_own_model_types(path)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # missing, damaged or not a causal-LM checkpoint
        raise DadpoError(f"cannot load model {spec!r}: {_first_line(e)}") from None
    _fix_chat_eos(model, tok)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


def _first_line(e: Exception) -> str:
    """An exception's message as one line: its first, and the next too when the first only leads into it."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
