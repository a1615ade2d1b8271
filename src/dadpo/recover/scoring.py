"""π_ref and π_te scores of every pair, computed once before training: sequence log-probs of both
responses (and the teacher's top-k log-probs per response position for token KD), cached in scores.pt."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dadpo.distributed import agree, on_main, rank_and_world, shard, unshard
from dadpo.models import load_model
from dadpo.recover.batching import in_length_order
from dadpo.recover.config import RecoverConfig
from dadpo.recover.forward import response_logps, teacher_topk
from dadpo.recover.pairs import PairCollator


def batches(examples: list[dict], size: int, pad_id: int, desc: str, device: torch.device, by_length: bool = False):
    """(examples, collated batch) in chunks of `size`, every tensor of the batch on `device` (the model's:
    a model on cuda never meets a cpu batch, cached scores included). `by_length`: the chunks are cut from
    the examples in length order (less padding), so results must be kept per example. Under N processes
    each gets its `shard` of the chunks, the same chunks one process makes (so the same numbers); `unshard`
    puts the per-chunk results back in order."""
    collate = PairCollator(pad_id)
    if by_length:
        examples = in_length_order(examples)
    rank, world = rank_and_world()
    starts = shard(list(range(0, len(examples), size)), rank, world)
    for s in tqdm(starts, desc=desc, unit="batch", disable=rank > 0):
        chunk = examples[s:s + size]
        yield chunk, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}


def autocast(cfg: RecoverConfig):
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                          enabled=cfg.bf16)


@torch.no_grad()
def sequence_scores(spec: str, examples: list[dict], cfg: RecoverConfig, prefix: str, n_topk: int = 0) -> dict:
    """{id: {prefix_chosen_logps, prefix_rejected_logps[, topk_logps, topk_ids]}} under model `spec`;
    top-k only for the first `n_topk` examples (the training pairs)."""
    model, tok = load_model(spec)
    per_chunk: list[dict[str, dict]] = []
    topk_ids = {ex["id"] for ex in examples[:n_topk]} if cfg.needs_topk else set()
    for chunk, batch in batches(examples, cfg.batch_size, tok.pad_token_id, f"score {prefix}", model.device,
                                cfg.group_by_length):
        scores: dict[str, dict] = {}
        per_chunk.append(scores)
        with autocast(cfg):
            out = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        n = len(chunk)
        rejected = out.sums.shape[0] > n
        for i, ex in enumerate(chunk):
            row = scores.setdefault(ex["id"], {})
            row[f"{prefix}_chosen_logps"] = out.sums[i].item()
            if rejected:
                row[f"{prefix}_rejected_logps"] = out.sums[n + i].item()
        wanted = [i for i, ex in enumerate(chunk) if ex["id"] in topk_ids]
        if wanted:  # the chosen rows of training pairs (a length-ordered chunk may mix in held-out ones)
            keep = torch.isin(out.rows, torch.tensor(wanted, device=out.rows.device))
            rows = out.rows[keep]
            with autocast(cfg):
                v, ids = teacher_topk(model, out.hidden[keep], cfg.kd.top_k)
            for i in wanted:
                sel = rows == i
                scores[chunk[i]["id"]]["topk_logps"] = v[sel].float().cpu()
                scores[chunk[i]["id"]]["topk_ids"] = ids[sel].to(torch.int64).cpu()
    return {k: row for part in unshard(per_chunk) for k, row in part.items()}


def score_pairs(path: Path, ref_dir: Path, teacher: str, examples: list[dict], n_train: int, cfg: RecoverConfig
           ) -> dict[str, dict]:
    """π_ref and π_te sequence log-probs of both responses per pair (teacher top-k for KD), cached in `path`
    (split across processes, written by the main one)."""
    if agree(path.is_file()):
        return torch.load(path, weights_only=True)
    ref = sequence_scores(str(ref_dir), examples, cfg, "ref")
    te = sequence_scores(teacher, examples, cfg, "teacher", n_topk=n_train)
    scores = {k: {**ref[k], **te[k]} for k in ref}

    def save():
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(scores, tmp)
        os.replace(tmp, path)

    on_main(save)
    return scores
