"""Fidelity and size of `dadpo export` GGUFs in a real llama.cpp (llama-cpp-python, built by `make setup`).

Usage:
    python benchmarks/export_gguf.py runs/demo/recover/model --out runs/export-bench [--windows 40]

For each of f32, f16 and q8_0: export time, file size, the largest next-token log-prob difference from
transformers on 4 chat prompts (over all tokens, and over tokens transformers gives p ≥ 1e-2), whether
the greedy continuations of 16 tokens agree, WikiText-2 perplexity on the first --windows windows of 128
tokens against transformers' on the same token windows, and llama.cpp's prompt-processing speed on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dadpo.export import export_gguf
from dadpo.models import load_model
from dadpo.perplexity import load_corpus, perplexity

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Name three colours."]


def llama_cpp(path: Path):
    """llama.cpp with an f32 KV cache (its default f16 one adds its own error) and no CPU weight repacking
    (as `llama-server --no-repack`): this llama.cpp's AMX repacked path segfaults on quantized matrices."""
    from unittest import mock

    import gguf
    import llama_cpp as binding
    from llama_cpp import Llama

    def params_without_repacking():
        params = default_params()
        params.use_extra_bufts = False
        return params

    default_params = binding.llama_model_default_params
    f32 = int(gguf.GGMLQuantizationType.F32)
    with mock.patch.object(binding.llama.llama_cpp, "llama_model_default_params", params_without_repacking):
        return Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, seed=0,
                     type_k=f32, type_v=f32, verbose=False)


def greedy(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < n and not (out and out[-1] in stop):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--data-dir", default=None, help="folder with wikitext2_raw (default $DADPO_DATA_DIR)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    model, tok = load_model(args.model_dir, device="cpu")
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    text = load_corpus("wikitext2", args.data_dir)[:80_000]
    ids = tok(text, add_special_tokens=False).input_ids[: args.windows * 128]
    hf_ppl = perplexity(model, tok, text, seq_len=128, max_windows=args.windows, progress=False)["ppl"]
    prompts, hf = [], []
    for prompt in PROMPTS:
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([chat])).logits[0, -1].double(), -1)
        greedy_hf = model.generate(torch.tensor([chat]), max_new_tokens=16, do_sample=False)[0, len(chat):]
        prompts.append(chat)
        hf.append((logp, greedy_hf.tolist()))

    rows = []
    for outtype in ("f32", "f16", "q8_0"):
        path = out / f"model-{outtype}.gguf"
        t0 = time.perf_counter()
        summary = export_gguf(args.model_dir, path, outtype, overwrite=True)
        seconds = time.perf_counter() - t0
        llm = llama_cpp(path)
        worst, worst_likely, agree = 0.0, 0.0, 0
        for chat, (logp, greedy_hf) in zip(prompts, hf, strict=True):
            llm.reset()
            llm.eval(chat)
            diff = (torch.log_softmax(torch.tensor(llm.scores[len(chat) - 1], dtype=torch.float64), -1) - logp).abs()
            worst = max(worst, diff.max().item())
            worst_likely = max(worst_likely, diff[logp >= np.log(1e-2)].max().item())
            agree += greedy(llm, chat, 16, stop) == greedy_hf
        nll, t0 = [], time.perf_counter()
        for w in range(args.windows):
            window = ids[w * 128:(w + 1) * 128]
            llm.reset()
            llm.eval(window)
            logp = torch.log_softmax(torch.tensor(llm.scores[:127], dtype=torch.float64), -1)
            nll.append(-logp[torch.arange(127), torch.tensor(window[1:])].mean().item())
        tok_s = args.windows * 128 / (time.perf_counter() - t0)
        ppl = float(np.exp(np.mean(nll)))
        rows.append({"outtype": outtype, "export_s": round(seconds, 1), "mib": round(summary["bytes"] / 2**20, 1),
                     "kept_f16": len(summary["kept_f16"]), "max_logprob_diff": round(worst, 4),
                     "max_logprob_diff_p_ge_1e-2": round(worst_likely, 4), "greedy_agree": f"{agree}/{len(PROMPTS)}",
                     "ppl": round(ppl, 3), "ppl_hf": round(hf_ppl, 3), "ppl_ratio": round(ppl / hf_ppl, 5),
                     "llama_cpp_prompt_tok_s": round(tok_s)})
        del llm

    import llama_cpp as lc

    result = {"model": args.model_dir, "windows": args.windows, "llama_cpp_python": lc.__version__,
              "machine": f"{platform.processor() or platform.machine()}, torch threads 2", "rows": rows}
    (out / "export.json").write_text(json.dumps(result, indent=1))
    print(f"| type | MiB | export s | matrices kept f16 | max Δlog-p (all) | max Δlog-p (p≥1e-2) | greedy 16 "
          f"agree | PPL@128 ×{args.windows} | HF PPL | ratio | llama.cpp prompt tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['outtype']} | {r['mib']} | {r['export_s']} | {r['kept_f16']} | {r['max_logprob_diff']} | "
              f"{r['max_logprob_diff_p_ge_1e-2']} | {r['greedy_agree']} | {r['ppl']} | {r['ppl_hf']} | "
              f"{r['ppl_ratio']} | {r['llama_cpp_prompt_tok_s']} |")


if __name__ == "__main__":
    main()
