"""Non-uniform pruned models as ordinary transformers classes, so `from_pretrained` loads them.

For each supported family (Llama, Qwen2, Mistral) we define `DadpoPruned<Family>Config`, the family's
config plus three per-layer lists (`layer_intermediate_sizes`, `layer_num_attention_heads`,
`layer_num_key_value_heads`), and `DadpoPruned<Family>ForCausalLM`, the family's model whose `__init__`
resizes each layer's projections to those widths before weights load. Both are registered with
`AutoConfig` / `AutoModelForCausalLM` under model_type `dadpo_pruned_<family>` when this module is
imported (`dadpo.models` does before any load), so a saved non-uniform model is plain safetensors + config.json,
loadable with `AutoModelForCausalLM.from_pretrained(DIR)` and trainable with peft like its family.

This module imports only torch, transformers and huggingface_hub: `save_pretrained` copies it into every
saved non-uniform folder with an `auto_map` (the classes are registered for Auto classes), so where dadpo
is not installed `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads the folder
through this very file. Where it is imported, the local registration wins and no remote code runs.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

PER_LAYER_FIELDS = ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads")
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def _linear(src: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=src.bias is not None, device=src.weight.device, dtype=src.weight.dtype)


def resize_layers(model, config) -> None:
    """Give every decoder layer the widths listed in the config's per-layer fields (fresh weights)."""
    hidden = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        inter = config.layer_intermediate_sizes[i]
        if mlp.gate_proj.out_features != inter:
            mlp.gate_proj = _linear(mlp.gate_proj, hidden, inter)
            mlp.up_proj = _linear(mlp.up_proj, hidden, inter)
            mlp.down_proj = _linear(mlp.down_proj, inter, hidden)
        nq, nkv, d = config.layer_num_attention_heads[i], config.layer_num_key_value_heads[i], attn.head_dim
        if attn.q_proj.out_features != nq * d:
            attn.q_proj = _linear(attn.q_proj, hidden, nq * d)
            attn.o_proj = _linear(attn.o_proj, nq * d, hidden)
        if attn.k_proj.out_features != nkv * d:
            attn.k_proj = _linear(attn.k_proj, hidden, nkv * d)
            attn.v_proj = _linear(attn.v_proj, hidden, nkv * d)
        attn.num_key_value_groups = nq // nkv


def _make_classes(family: str, base_config: type, base_model: type) -> tuple[type, type]:
    fields = {name: list[int] | None for name in PER_LAYER_FIELDS}
    config_cls = strict(type(f"DadpoPruned{base_config.__name__}", (base_config,), {
        "__module__": __name__, "__annotations__": fields, "model_type": f"dadpo_pruned_{family}",
        "__doc__": f"{base_config.__name__} with per-layer MLP widths and head counts (a dadpo prune).",
        **dict.fromkeys(PER_LAYER_FIELDS)}))

    def __init__(self, config):
        base_model.__init__(self, config)
        resize_layers(self, config)

    model_cls = type(f"DadpoPruned{base_model.__name__}", (base_model,), {
        "__module__": __name__, "config_class": config_cls, "__init__": __init__,
        "__doc__": f"{base_model.__name__} whose layers have the widths of a non-uniform dadpo prune."})
    config_cls.register_for_auto_class()  # save_pretrained writes this file + auto_map beside the weights
    model_cls.register_for_auto_class("AutoModelForCausalLM")
    return config_cls, model_cls


#: family model_type -> (pruned config class, pruned model class)
PRUNED_CLASSES: dict[str, tuple[type, type]] = {}
for _family, (_cfg, _model) in FAMILIES.items():
    PRUNED_CLASSES[_family] = _make_classes(_family, _cfg, _model)
    globals()[PRUNED_CLASSES[_family][0].__name__], globals()[PRUNED_CLASSES[_family][1].__name__] = \
        PRUNED_CLASSES[_family]
    AutoConfig.register(PRUNED_CLASSES[_family][0].model_type, PRUNED_CLASSES[_family][0], exist_ok=True)
    AutoModelForCausalLM.register(PRUNED_CLASSES[_family][0], PRUNED_CLASSES[_family][1], exist_ok=True)


def family_of(config) -> str | None:
    """The supported family a config belongs to ('llama', 'qwen2', 'mistral'), else None."""
    model_type = config.model_type.removeprefix("dadpo_pruned_")
    return model_type if model_type in FAMILIES else None


def to_non_uniform(model) -> None:
    """Turn a pruned model of a supported family into its DadpoPruned* class, recording per-layer widths."""
    family = family_of(model.config)
    config_cls, model_cls = PRUNED_CLASSES[family]
    layers = model.model.layers
    widths = {
        "layer_intermediate_sizes": [lay.mlp.gate_proj.out_features for lay in layers],
        "layer_num_attention_heads": [lay.self_attn.q_proj.out_features // lay.self_attn.head_dim for lay in layers],
        "layer_num_key_value_heads": [lay.self_attn.k_proj.out_features // lay.self_attn.head_dim for lay in layers],
    }
    # Every submodule shares this config object, so change its class in place rather than replacing it.
    model.config.__class__ = config_cls
    for name, value in widths.items():
        setattr(model.config, name, value)
    model.__class__ = model_cls
