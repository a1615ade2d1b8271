"""The prune stage: structured, GQA-aware pruning of a chat LLM to an exact fraction of its parameters.

Design
------
- What is pruned: MLP intermediate channels (grouped by torch-pruning's dependency graph, traced per
  MLP block) and attention heads (query heads one per KV group at a time, or whole KV groups with their
  query heads, so the result is still valid GQA), in a chosen layer range. Cuts are made with
  torch-pruning's pruning functions; no weights are copied by hand.
- Importance: taylor (|w·∂L/∂w| on chat-formatted calibration data), activation (|w|·||x||),
  magnitude (L2), random; summed over each unit's weights so scores compare across layers and kinds.
- Ratio: a fraction of ALL parameters (embeddings counted), hit within ±0.5 pp by solving the MLP width
  (uniform) or by removing the lowest score-per-parameter units across layers (global).
- Saving: uniform results are plain models of their family (config widths updated), loadable with
  `AutoModelForCausalLM.from_pretrained` anywhere. Non-uniform results use `DadpoPruned<Family>` config
  and model classes (`dadpo.modeling_dadpo_pruned`, below both `dadpo.models` and this stage) that carry
  per-layer widths in config.json; importing that module (as `dadpo.models` does before loading) registers
  them with transformers' Auto classes, so `from_pretrained` loads them too — no pickles. The saved folder
  also carries that module and an `auto_map`, so without dadpo `from_pretrained(DIR, trust_remote_code=True)`
  loads it (the way hub models with custom code ship).

Modules: `config` (PruneConfig), `importance` (scores), `plan` (what to cut),
`pruner` (cutting), `api` (prune / prune_to_dir), `report`, `cli` (`dadpo prune`).
"""

from dadpo.prune.config import PruneConfig

__all__ = ["PruneConfig", "prune", "prune_to_dir"]


def __getattr__(name: str):
    if name in ("prune", "prune_to_dir"):  # imported lazily: they pull in torch, `dadpo --help` should not
        from dadpo.prune import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
