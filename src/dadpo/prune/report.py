"""pruning.json (what was done, for provenance) and report.md (human summary) of a pruned model dir."""

from __future__ import annotations

PRUNING_KEYS = ("source_model", "importance", "targets", "allocation", "ratio_asked", "ratio_achieved",
                "ratio_achieved_non_embedding", "params_before", "params_after", "uniform", "layers_pruned",
                "reconstructed", "layer_widths", "calibration", "libraries", "created", "prune_seconds")


def pruning_record(report: dict) -> dict:
    """The provenance subset of a prune report, plus the full config used."""
    return {**{k: report.get(k) for k in PRUNING_KEYS}, "config": report.get("config")}


def _ppl(side: dict) -> str:
    p = side.get("perplexity")
    return f"{p['ppl']:.2f}" if p else "skipped"


def _windows(ppl: dict) -> str:
    """Which windows were scored: every one of the text, or every k-th (the proxy)."""
    stride = ppl.get("window_stride", 1)
    return f"{ppl['windows']} windows" + (f": every {stride}-th of the text (proxy)" if stride > 1 else "")


def render_markdown(r: dict) -> str:
    b, a = r["params_before"], r["params_after"]
    ppl = r["after"].get("perplexity") or r["before"].get("perplexity")
    ppl_note = f" ({r['config']['ppl_corpus']}, seq_len {ppl['seq_len']}, {_windows(ppl)})" if ppl else ""
    lines = [
        f"# Pruned {r['source_model']}",
        "",
        f"- criterion: **{r['importance']}**, targets: {r['targets']}, allocation: {r['allocation']}, "
        f"layers {r['layers_pruned'][0]}:{r['layers_pruned'][1]}, least-squares refit of kept columns: "
        f"{'yes' if r.get('reconstructed') else 'no'}",
        f"- ratio asked {r['ratio_asked']:.3f}, achieved **{r['ratio_achieved']:.4f}** of all parameters "
        f"({r['ratio_achieved_non_embedding']:.4f} of non-embedding parameters)",
        f"- parameters: {b['total']:,} → {a['total']:,} (non-embedding {b['non_embedding']:,} → "
        f"{a['non_embedding']:,})",
        f"- layers {'uniform (plain model class)' if r['uniform'] else 'non-uniform (DadpoPruned* class)'}",
        f"- time: prune {r['prune_seconds']} s, total {r.get('seconds_total')} s; peak memory "
        f"{r.get('peak_memory_mb')} MB",
        f"- reload max |logit diff|: {r.get('reload_max_abs_logit_diff')}",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| perplexity{ppl_note} | {_ppl(r['before'])} | {_ppl(r['after'])} |",
        "",
        f"**Sample** — prompt: {r['config']['sample_prompt']}",
        "",
        f"- dense: {r['before'].get('sample', '')!r}",
        f"- pruned: {r['after'].get('sample', '')!r}",
        "",
        "## Layer widths",
        "",
        "| layer | MLP | q heads | kv heads |",
        "|---|---|---|---|",
        *(f"| {i} | {w['intermediate_size']} | {w['num_attention_heads']} | {w['num_key_value_heads']} |"
          for i, w in enumerate(r["layer_widths"])),
    ]
    return "\n".join(lines) + "\n"
