"""Find the prunable units of a decoder-only chat model and remove planned ones with torch-pruning.

MLP channels are grouped by torch-pruning's dependency graph, traced per MLP block (gate/up rows and the
matching down_proj column go together; biases included when a family has them). Attention heads are
grouped from the config's GQA layout instead: torch-pruning 1.6's whole-model trace never finishes
grouping q_proj (its index mapping cycles through rotate_half's cat and repeat_kv), so query heads,
KV heads and o_proj columns are matched by head index and cut with torch-pruning's Linear pruning
functions. After cutting, attention attributes and the config are updated so the model stays a valid
model of its class (uniform) or becomes a `DadpoPruned*` class carrying per-layer widths (non-uniform).
"""

from __future__ import annotations

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch import nn

from dadpo.errors import DadpoError
from dadpo.modeling_dadpo_pruned import FAMILIES, family_of, to_non_uniform
from dadpo.prune.importance import LayerUnits
from dadpo.prune.plan import LayerPlan


def check_supported(config) -> str:
    """The model's family, or a DadpoError naming the unsupported architecture."""
    family = family_of(config)
    if family is None:
        raise DadpoError(f"--model: architecture {config.model_type!r} is not supported by prune "
                         f"(supported: {', '.join(FAMILIES)})")
    return family


def count_params(model) -> dict[str, int]:
    """Parameters in total (tied weights once) and in the input/output embeddings."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    out = model.get_output_embeddings()
    if out is not None:
        emb[id(out.weight)] = out.weight.numel()
    return {"total": total, "embeddings": sum(emb.values()), "non_embedding": total - sum(emb.values())}


def _mlp_graph(mlp: nn.Module, hidden: int):
    """torch-pruning's dependency graph of one MLP block (traced alone, so its groups stay inside the block)."""
    import torch_pruning as tp

    w = mlp.gate_proj.weight
    graph = tp.DependencyGraph().build_dependency(mlp, example_inputs=torch.zeros(1, 1, hidden, dtype=w.dtype,
                                                                                  device=w.device))
    return graph


def build_units(model, layers: range) -> tuple[list[LayerUnits], dict[int, object]]:
    """LayerUnits of the layers to prune and the per-layer MLP dependency graphs that will cut them."""
    import torch_pruning as tp

    units, graphs = [], {}
    hidden = model.config.hidden_size
    for i in layers:
        layer = model.model.layers[i]
        mlp, attn = layer.mlp, layer.self_attn
        graph = _mlp_graph(mlp, hidden)
        group = graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels,
                                        idxs=list(range(mlp.gate_proj.out_features)))
        parts = [(dep.target.module, "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in")
                 for dep, _ in group if isinstance(dep.target.module, nn.Linear)]
        d = attn.head_dim
        units.append(LayerUnits(
            index=i, mlp_parts=parts, head_dim=d, n_q=attn.q_proj.out_features // d,
            n_kv=attn.k_proj.out_features // d,
            attn_parts={"q": (attn.q_proj, "out"), "k": (attn.k_proj, "out"), "v": (attn.v_proj, "out"),
                        "o": (attn.o_proj, "in")}))
        graphs[i] = graph
    return units, graphs


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + k for h in heads for k in range(head_dim)]


def _dropped_q_heads(u: LayerUnits, plan: LayerPlan) -> list[int]:
    """Query heads a plan removes: its own plus every query head of a dropped KV group."""
    group = u.n_q // u.n_kv
    return sorted(set(plan.q) | {j * group + k for j in plan.kv for k in range(group)})


def consumer_linears(u: LayerUnits) -> list[nn.Linear]:
    """The Linears of a layer whose input columns pruning removes (down_proj, o_proj)."""
    return [lin for lin, side in u.mlp_parts if side == "in"] + [u.attn_parts["o"][0]]


def dropped_inputs(u: LayerUnits, plan: LayerPlan) -> list[tuple[nn.Linear, list[int]]]:
    """(Linear, input columns the plan removes) for each layer that reads pruned units (down_proj, o_proj)."""
    out = [(lin, sorted(plan.mlp)) for lin, side in u.mlp_parts if side == "in" and plan.mlp]
    q_heads = _dropped_q_heads(u, plan)
    if q_heads:
        out.append((u.attn_parts["o"][0], _head_rows(q_heads, u.head_dim)))
    return out


def apply_plan(model, units: list[LayerUnits], graphs: dict, plans: dict[int, LayerPlan]) -> None:
    """Cut the planned units out of the model and make its config describe the new shapes."""
    import torch_pruning as tp

    for u in units:
        plan = plans[u.index]
        layer = model.model.layers[u.index]
        mlp, attn = layer.mlp, layer.self_attn
        if plan.mlp:
            graphs[u.index].get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels,
                                              idxs=sorted(plan.mlp)).prune()
        q_heads = _dropped_q_heads(u, plan)
        if q_heads:
            rows = _head_rows(q_heads, u.head_dim)
            tp.prune_linear_out_channels(attn.q_proj, rows)
            tp.prune_linear_in_channels(attn.o_proj, rows)
        if plan.kv:
            rows = _head_rows(sorted(plan.kv), u.head_dim)
            tp.prune_linear_out_channels(attn.k_proj, rows)
            tp.prune_linear_out_channels(attn.v_proj, rows)
        n_q, n_kv = attn.q_proj.out_features // u.head_dim, attn.k_proj.out_features // u.head_dim
        if n_q % n_kv:
            raise RuntimeError(f"layer {u.index}: {n_q} query heads do not split over {n_kv} KV heads")
        attn.num_key_value_groups = n_q // n_kv
    update_config(model)


def layer_widths(model) -> list[dict[str, int]]:
    """MLP width and head counts of every decoder layer."""
    out = []
    for layer in model.model.layers:
        attn, d = layer.self_attn, layer.self_attn.head_dim
        out.append({"intermediate_size": layer.mlp.gate_proj.out_features,
                    "num_attention_heads": attn.q_proj.out_features // d,
                    "num_key_value_heads": attn.k_proj.out_features // d})
    return out


def update_config(model) -> bool:
    """Write the new widths into the config; returns True when the result is a plain model of its family.

    That needs all layers alike and a config the family accepts (Llama insists that the head count
    divides hidden_size even with an explicit head_dim); otherwise the model becomes DadpoPruned*.
    """
    widths = layer_widths(model)
    cfg = model.config
    uniform = all(w == widths[0] for w in widths) and getattr(cfg, "layer_intermediate_sizes", None) is None
    if uniform:
        saved = {k: cfg.__dict__[k] for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads",
                                              "head_dim") if k in cfg.__dict__}
        cfg.intermediate_size = widths[0]["intermediate_size"]
        cfg.num_attention_heads = widths[0]["num_attention_heads"]
        cfg.num_key_value_heads = widths[0]["num_key_value_heads"]
        cfg.head_dim = model.model.layers[0].self_attn.head_dim  # no longer hidden_size // num_attention_heads
        try:
            cfg.validate()
            return True
        except StrictDataclassClassValidationError:
            if "head_dim" not in saved:
                del cfg.head_dim
            for k, v in saved.items():
                setattr(cfg, k, v)
    to_non_uniform(model)
    return False
