"""`dadpo export`: a model folder (a dadpo prune, a recovered student, or any Llama/Mistral/Qwen2 model) as
a llama.cpp GGUF that keeps per-layer widths.

llama.cpp's `llama` architecture reads one feed-forward width and one head count for every layer, so a
non-uniform prune is written under its `deci` architecture (the Llama variant of Nemotron-51B, whose
layers differ in width): `deci.feed_forward_length`, `deci.attention.head_count` and `…head_count_kv` are
per-layer arrays and every layer's tensors are created with its own sizes. Its graph is Llama's (RMSNorm,
SwiGLU, "normal" RoPE on consecutive pairs, optional q/k/v/o and MLP biases), so Qwen2 (q/k/v biases)
fits too. Verified with llama.cpp as vendored by llama-cpp-python 0.3.36 (llama.cpp commit 0c1e570).

Q and K rows are permuted from transformers' rotate-half layout to the consecutive-pair layout that
"normal" RoPE expects, per layer with that layer's head count. Tokenizer: byte-level BPE from
tokenizer.json (tokens, merges, token types, special ids, chat template); llama.cpp's pre-tokenizer is
chosen from tokenizer.json's own pre-tokenizer, and tokenizers it cannot express are refused.

Types: f32; f16 (matrices in f16, norms and biases in f32, as llama.cpp's converter does, except the output
layer: its weight, or `token_embd` when the embeddings are tied, stays f32, because rounding the
49k-way output matrix alone moves next-token log-probs by ~0.04 and keeping it costs ~54 MB at 135M
parameters, which brings tokens with p ≥ 1e-2 within 1e-2 of transformers); q8_0 quantizes
a matrix in blocks of 32 values along each row, so a matrix whose rows are not a multiple of 32 long (the
down projection of a layer pruned to 936 channels) is kept in f16 and listed in the report; prune with
`prune.mlp_round_to: 32` to avoid that.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dadpo.errors import DadpoError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
ARCH = "deci"
#: written into every export, so `--overwrite` replaces only a file that dadpo made
MARKER_KEY = "dadpo.export.source"

_GPT2_BYTELEVEL = {"type": "ByteLevel", "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a tokenizer.json pre-tokenizer that it splits text the
    same way as, else None: GPT-2's byte-level regex ("gpt-2"), single digits then GPT-2's regex
    ("smollm"), Llama-3's split ("llama-bpe") and Qwen2's ("qwen2")."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _config(model_dir: Path) -> dict:
    from dadpo.io import load_json_object
    from dadpo.modeling_dadpo_pruned import FAMILIES  # the families dadpo prunes: the ones exported

    cfg = load_json_object(model_dir / "config.json", f"export: {model_dir}")
    family = str(cfg.get("model_type", "")).removeprefix("dadpo_pruned_")
    if family not in FAMILIES:
        raise DadpoError(f"export: model_type {cfg.get('model_type')!r} of {model_dir} is not supported "
                         f"(export writes {', '.join(FAMILIES)} and dadpo's prunes of them)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise DadpoError(f"export: {model_dir} uses RoPE scaling {rope.get('rope_type', rope.get('type'))!r}, "
                         "which this export cannot express")
    if cfg.get("hidden_act", "silu") != "silu":
        raise DadpoError(f"export: activation {cfg['hidden_act']!r} of {model_dir} cannot be expressed (SwiGLU only)")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", family == "mistral") else None
    if window and window < cfg.get("max_position_embeddings", 0):
        raise DadpoError(f"export: {model_dir} uses sliding-window attention ({window} tokens), which the "
                         f"'{ARCH}' architecture cannot express")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise DadpoError(f"export: {model_dir} rotates part of each head only, which this export cannot express")
    return cfg


def _tokenizer(model_dir: Path) -> tuple[dict, str]:
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DadpoError(f"export: {model_dir} has no readable tokenizer.json ({e}); export needs a fast "
                         "(tokenizers) byte-level BPE tokenizer") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise DadpoError(f"export: the tokenizer of {model_dir} is not byte-level BPE ({model.get('type')}); "
                         "export supports byte-level BPE tokenizers (SmolLM2, Llama-3, Qwen2) only")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise DadpoError(f"export: llama.cpp has no pre-tokenizer known to split text like {model_dir}'s "
                         f"tokenizer.json ({json.dumps(tj.get('pre_tokenizer'))[:120]})")
    return tj, pre


def _weights(model_dir: Path):
    """(name, float32 numpy array) of every tensor in the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise DadpoError(f"export: {model_dir} holds no safetensors weights (model.safetensors or its index)")
    for name in files:
        with safe_open(model_dir / name, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key).float().numpy()


def _rope_pairs(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection (or bias) from rotate-half order to consecutive pairs, head by head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stored(name: str, w: np.ndarray, outtype: str, kept_f16: list[str], output: str):
    """(array, raw ggml type or None) for tensor `name` in `outtype`; `output` names the tensor that
    llama.cpp's output layer reads (f32 in an f16 export)."""
    import gguf
    import numpy as np

    if w.ndim == 1 or outtype == "f32" or (outtype == "f16" and name == output):
        return w.astype(np.float32), None
    if outtype == "q8_0":
        if w.shape[-1] % 32 == 0:
            return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        kept_f16.append(f"{name} (rows of {w.shape[-1]})")
    return w.astype(np.float16), None


def check_gguf_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists unless `overwrite` and it is a GGUF that dadpo export wrote."""
    from dadpo.io import check_out_path

    check_out_path(out, "--gguf", folder=False, replaced=True)
    if not out.exists():
        return
    if not overwrite:
        raise DadpoError(f"--gguf {out} exists; pass --overwrite to replace it")
    import gguf

    try:
        made_by_us = MARKER_KEY in gguf.GGUFReader(out).fields
    except (OSError, ValueError) as e:
        raise DadpoError(f"--gguf {out} exists and is not a GGUF ({e}); dadpo replaces only its own exports") \
            from None
    if not made_by_us:
        raise DadpoError(f"--gguf {out} exists and was not written by dadpo export; it is left alone")


def export_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16", *, overwrite: bool = False) -> dict:
    """Write `model_dir` as a llama.cpp GGUF at `out` (atomically); returns a summary of what was written."""
    import gguf

    from dadpo.io import atomic_path

    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise DadpoError(f"--outtype: choose one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if not model_dir.is_dir():
        raise DadpoError(f"export: {model_dir} is not a model folder")
    cfg = _config(model_dir)
    tj, pre = _tokenizer(model_dir)
    check_gguf_out(out, overwrite)

    n_layer, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    tensors = dict(_weights(model_dir))
    if cfg.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    rows = lambda name: tensors[name].shape[0] if name in tensors else 0  # noqa: E731
    layer = "model.layers.{}.".format
    n_ff = [rows(layer(i) + "mlp.gate_proj.weight") for i in range(n_layer)]
    n_head = [rows(layer(i) + "self_attn.q_proj.weight") // head_dim for i in range(n_layer)]
    n_head_kv = [rows(layer(i) + "self_attn.k_proj.weight") // head_dim for i in range(n_layer)]
    if 0 in n_ff or 0 in n_head_kv:
        raise DadpoError(f"export: {model_dir} has a layer without attention or MLP weights; not expressible")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, n_layer)
    kept_f16: list[str] = []
    output = "output.weight" if "lm_head.weight" in tensors else "token_embd.weight"
    stored = []
    for name, w in tensors.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise DadpoError(f"export: tensor {name} of {model_dir} has no place in a '{ARCH}' GGUF")
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            i = int(name.split(".")[2])
            w = _rope_pairs(w, n_head[i] if ".q_proj." in name else n_head_kv[i])
        stored.append((target, *_stored(target, w, outtype, kept_f16, output)))

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file INFO lines name our temp file
    with atomic_path(out, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_dir.resolve().name)
        w.add_string(MARKER_KEY, str(model_dir.resolve()))
        w.add_context_length(cfg.get("max_position_embeddings", 2048))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        rope = cfg.get("rope_parameters") or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, model_dir, tj, pre, cfg["vocab_size"])
        for name, data, raw in stored:
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    summary = {"gguf": str(out), "arch": ARCH, "outtype": outtype, "pre_tokenizer": pre,
               "feed_forward_length": n_ff, "head_count": n_head, "head_count_kv": n_head_kv,
               "kept_f16": kept_f16, "bytes": out.stat().st_size}
    if kept_f16:
        log.warning("export: %d matrices kept in f16 (q8_0 needs rows that are a multiple of 32): %s",
                    len(kept_f16), ", ".join(kept_f16[:4]) + (" …" if len(kept_f16) > 4 else ""))
    return summary


def _add_tokenizer(w, model_dir: Path, tj: dict, pre: str, n_vocab: int) -> None:
    """Byte-level BPE tokens with their types, merges, special ids and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    vocab.update((content, t["id"]) for content, t in added.items())
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding may be larger than the vocabulary: pad with unused tokens
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    hf = AutoTokenizer.from_pretrained(model_dir)
    probe = hf("a")["input_ids"]
    special.add_special_token = {"bos": bool(probe) and probe[0] == hf.bos_token_id,
                                 "eos": bool(probe) and probe[-1] == hf.eos_token_id and len(probe) > 1}
    special.add_to_gguf(w, quiet=True)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a pruned or recovered model as a llama.cpp GGUF (per-layer widths kept)",
        description="Write a model folder (a dadpo prune or recover output, or a Llama/Mistral/Qwen2 folder) "
        "as a llama.cpp GGUF under the 'deci' architecture, which keeps every layer's MLP width and head "
        "counts. Serve it with llama.cpp (llama-server -m OUT.gguf) or anything built on it. A non-uniform "
        "folder also loads without dadpo via transformers: from_pretrained(DIR, trust_remote_code=True).")
    p.add_argument("model_dir", metavar="DIR", help="model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="output file (written atomically)")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES,
                   help="f32; f16 (default); q8_0 (matrices whose rows are not a multiple of 32 stay f16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if dadpo export wrote it")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    s = export_gguf(args.model_dir, args.gguf, args.outtype, overwrite=args.overwrite)
    kept = f"; kept in f16: {len(s['kept_f16'])} matrices" if s["kept_f16"] else ""
    print(f"wrote {s['gguf']} ({s['bytes'] / 2**20:.1f} MiB, {s['outtype']}, arch {s['arch']}, "
          f"pre-tokenizer {s['pre_tokenizer']}; MLP widths {min(s['feed_forward_length'])}–"
          f"{max(s['feed_forward_length'])}{kept})")
    return 0
