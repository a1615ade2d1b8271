"""Run under torchrun by tests/test_distributed.py: the gradients of recover's forward (response log-probs and
the KD logits, both read through the tied output layer after the wrapped forward) on a model sharded by
torch's FSDP2 across the processes equal those of the whole batch on an unsharded copy in one process."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from dadpo.recover.forward import output_logits, response_logps


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def loss(m, ids, mask, labels) -> torch.Tensor:
    out = response_logps(m, ids, mask, labels)
    return -out.sums.sum() + 0.1 * torch.logsumexp(output_logits(m, out.hidden), -1).sum()


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 300, (2 * world, 12), generator=g)
labels, mask = ids.clone(), torch.ones_like(ids)
labels[:, :5] = -100
labels[1, 9:], mask[1, 9:] = -100, 0  # a padded row

whole = model()
loss(whole, ids, mask, labels).backward()
sharded = model()
mesh = init_device_mesh("cpu", (world,))
for layer in sharded.model.layers:  # what accelerate's TRANSFORMER_BASED_WRAP does
    fully_shard(layer, mesh=mesh)
fully_shard(sharded, mesh=mesh)
mine = slice(2 * rank, 2 * rank + 2)
(world * loss(sharded, ids[mine], mask[mine], labels[mine])).backward()  # FSDP averages over processes
worst = 0.0
for p, q in zip(whole.parameters(), sharded.parameters(), strict=True):
    worst = max(worst, ((q.grad.full_tensor() - p.grad).abs().max() / p.grad.abs().max()).item())
if rank == 0:
    print(f"world {world}: worst relative gradient difference {worst:.2e}")
dist.destroy_process_group()
