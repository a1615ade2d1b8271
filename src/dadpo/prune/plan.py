"""Decide what to remove so that exactly a target number of parameters goes, uniformly or globally.

A `LayerPlan` lists, per decoder layer, the MLP channels, query heads and whole KV groups (a KV head with
all its query heads) to drop. Query heads are dropped one per KV group at a time (the lowest-scored in
each group), so every KV head keeps the same number of query heads and the layer stays valid GQA.

- uniform: every pruned layer loses the same number of MLP channels and the same share of heads; the
  head share follows the MLP's per-dimension ratio and the MLP width is then solved to hit the target.
- global: units from all pruned layers compete on score per parameter (lowest first), so widths differ
  per layer; a layer keeps at least 10% of its MLP, one KV head and one query head per KV head.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dadpo.errors import DadpoError
from dadpo.prune.importance import LayerUnits

MAX_MLP_PRUNE = 0.9  # a layer keeps at least 10% of its MLP channels


@dataclass
class LayerPlan:
    mlp: list[int] = field(default_factory=list)  # MLP channel indices to drop
    q: list[int] = field(default_factory=list)  # query heads to drop (besides those of dropped KV groups)
    kv: list[int] = field(default_factory=list)  # KV heads to drop, with all their query heads

    def removed(self, u: LayerUnits) -> int:
        group = u.n_q // u.n_kv
        q_gone = len(self.q) + group * len(self.kv)
        return len(self.mlp) * u.mlp_cost + q_gone * u.q_cost + len(self.kv) * u.kv_cost


class Move(NamedTuple):
    """One step of a removal plan: `units` (MLP channels, query heads, or one KV group) of a `kind` (mlp, q,
    kv), their summed importance `score` and the parameters `cost` that removing them frees."""

    score: float
    cost: int
    kind: str
    units: list[int]


def _attention_moves(u: LayerUnits) -> list[Move]:
    """Greedy sequence of GQA-valid head removals in one layer."""
    group = u.n_q // u.n_kv
    kept = {j: list(range(j * group, (j + 1) * group)) for j in range(u.n_kv)}
    moves = []
    while True:
        g = len(next(iter(kept.values())))
        options = []
        if g > 1:  # one query head (the weakest) out of every KV group
            heads = [min(qs, key=lambda h: u.q_scores[h].item()) for qs in kept.values()]
            options.append(Move(sum(u.q_scores[h].item() for h in heads), len(heads) * u.q_cost, "q", heads))
        if len(kept) > 1:  # a whole KV group with its remaining query heads
            def group_score(j):
                return u.kv_scores[j].item() + sum(u.q_scores[h].item() for h in kept[j])
            j = min(kept, key=group_score)
            options.append(Move(group_score(j), u.kv_cost + g * u.q_cost, "kv", [j]))
        if not options:
            return moves
        move = min(options, key=lambda m: m.score / m.cost)
        moves.append(move)
        if move.kind == "q":
            for h in move.units:
                kept[h // group].remove(h)
        else:
            del kept[move.units[0]]


def _apply_move(plan: LayerPlan, move: Move, group: int) -> None:
    if move.kind == "q":
        plan.q += move.units
    else:
        j = move.units[0]
        plan.kv.append(j)
        plan.q = [h for h in plan.q if h // group != j]


def plan_global(units: list[LayerUnits], target: int, targets: str, round_to: int) -> dict[int, LayerPlan]:
    """Drop the lowest score-per-parameter units across all layers until `target` parameters are gone."""
    plans = {u.index: LayerPlan() for u in units}
    streams = {}
    for u in units:
        moves = []
        if targets in ("mlp", "both"):
            order = torch.argsort(u.mlp_scores).tolist()
            limit = int(MAX_MLP_PRUNE * u.mlp_width)
            for start in range(0, limit - limit % round_to, round_to):
                block = order[start:start + round_to]
                moves.append(Move(u.mlp_scores[block].sum().item(), len(block) * u.mlp_cost, "mlp", block))
        streams[(u.index, "mlp")] = iter(moves)
        if targets in ("heads", "both"):
            streams[(u.index, "attn")] = iter(_attention_moves(u))
    by_index = {u.index: u for u in units}
    heap = []

    def push(key):
        move = next(streams[key], None)
        if move is not None:
            heapq.heappush(heap, (move.score / move.cost, key, move))

    for key in streams:
        push(key)
    removed = 0
    while heap and removed < target:
        _, key, move = heapq.heappop(heap)
        if removed + move.cost > target + move.cost / 2:  # would overshoot by more than half a move: stop this stream
            continue
        plan, u = plans[key[0]], by_index[key[0]]
        if move.kind == "mlp":
            plan.mlp += move.units
        else:
            _apply_move(plan, move, u.n_q // u.n_kv)
        removed += move.cost
        push(key)
    return plans


def _uniform_heads(u: LayerUnits, p: float, n_drop: int | None = None) -> LayerPlan:
    """Drop the share `p` (or `n_drop` per group) of heads: query heads within KV groups under GQA, whole
    heads without it."""
    group = u.n_q // u.n_kv
    plan = LayerPlan()
    if group > 1:
        n_drop = group - max(1, round((1 - p) * group)) if n_drop is None else n_drop
        for j in range(u.n_kv):
            qs = torch.arange(j * group, (j + 1) * group)
            plan.q += qs[torch.argsort(u.q_scores[qs])[:n_drop]].tolist()
    else:
        n_drop = u.n_kv - max(1, round((1 - p) * u.n_kv)) if n_drop is None else n_drop
        plan.kv = torch.argsort(u.kv_scores + u.q_scores)[:n_drop].tolist()
    return plan


def plan_uniform(units: list[LayerUnits], target: int, targets: str, round_to: int, tol: float = 0
                 ) -> dict[int, LayerPlan]:
    """Same cut in every pruned layer; the MLP width is solved so the total removed hits `target`."""
    layer_params = sum(u.mlp_width * u.mlp_cost + u.n_q * u.q_cost + u.n_kv * u.kv_cost for u in units)
    p = target / layer_params
    if targets == "heads":  # heads are coarse: take the per-layer count that lands closest to the target
        steps = max(u.n_q // u.n_kv if u.n_q > u.n_kv else u.n_kv for u in units)
        options = [{u.index: _uniform_heads(u, p, n) for u in units} for n in range(steps)]
        return min(options, key=lambda plans: abs(sum(plans[u.index].removed(u) for u in units) - target))
    plans: dict[int, LayerPlan] = {}
    for _ in range(20):  # fixed point: head share = MLP share (heads are coarse; MLP absorbs the rest)
        plans = {u.index: _uniform_heads(u, p) if targets != "mlp" else LayerPlan() for u in units}
        need = target - sum(plans[u.index].removed(u) for u in units)
        per_channel = sum(u.mlp_cost for u in units)
        n = max(0, round(need / per_channel / round_to) * round_to)
        if abs(need - n * per_channel) > tol:  # blocks too coarse for this model: cut single channels
            n = max(0, round(need / per_channel))
        width = units[0].mlp_width
        n = min(n, int(MAX_MLP_PRUNE * width))
        for u in units:
            plans[u.index].mlp = torch.argsort(u.mlp_scores)[:n].tolist()
        new_p = n / width
        if abs(new_p - p) < 1e-9:
            break
        p = new_p
    return plans


def make_plan(units: list[LayerUnits], target: int, total: int, targets: str, allocation: str,
              round_to: int) -> dict[int, LayerPlan]:
    """Plan the removal of `target` of `total` parameters; fail unless it lands within ±0.5 pp."""
    if allocation == "global":
        plans = plan_global(units, target, targets, round_to)
    else:
        plans = plan_uniform(units, target, targets, round_to, tol=0.0025 * total)
    removed = sum(plans[u.index].removed(u) for u in units)
    if abs(removed - target) > 0.005 * total:
        raise DadpoError(f"ratio {target / total:.3f} cannot be reached with targets={targets}, "
                         f"allocation={allocation} in the chosen layers (closest: {removed / total:.3f}); "
                         "prune more layers, other targets or a smaller ratio")
    return plans


def max_removable(units: list[LayerUnits], targets: str) -> int:
    """Most parameters the constraints let go: 90% of each MLP, all but one KV head and one query head each."""
    total = 0
    for u in units:
        if targets in ("mlp", "both"):
            total += int(MAX_MLP_PRUNE * u.mlp_width) * u.mlp_cost
        if targets in ("heads", "both"):
            total += (u.n_q - 1) * u.q_cost + (u.n_kv - 1) * u.kv_cost
    return total
