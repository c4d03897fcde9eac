"""seqpar in a training loop of your own (no ``seqpar train``): patch the model, shard each batch, the SP loss,
and the gradient sum over the SP group. Runs on CPU as written (tests/test_documented_commands.py runs it):

    torchrun --nproc_per_node 2 docs/examples/own_loop.py

Every rank of the SP group gets the same sequences; ``shard_batch`` keeps its tokens (labels shifted over the
whole sequence, global positions, ``cu_seqlens`` for packed documents); ``sp_cross_entropy`` is the mean over
the whole sequence, so each rank's backward gives its tokens' share of every gradient: summing the shares over
the SP group (one all-reduce) gives the gradient of one device on the whole sequence. With data parallelism
too, average over the DP group as usual (seqpar.parallel.ParallelState builds both groups).
"""

import copy

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from seqpar.models import (
    enable_checkpoint_offload,
    patch_model,
    patched_layout,
    shard_batch,
    sp_cross_entropy,
    tile_mlp,
)

dist.init_process_group("gloo")
group = dist.new_group(list(range(dist.get_world_size())))  # here all ranks form one SP group
torch.manual_seed(0)
config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
reference = copy.deepcopy(model)  # the same weights, unpatched, on the whole sequence (the check below)

patch_model(model, attention="ring", parallel=group)  # every attention layer: ring attention over the group
tile_mlp(model, chunk_size=64)  # the memory options: MLPs over 64-token tiles, checkpointed layers offloaded
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
enable_checkpoint_offload(model)  # a no-op without CUDA
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

ids = torch.randint(0, 260, (1, 512), generator=torch.Generator().manual_seed(1))  # the same batch on every rank
for step in range(3):
    batch = shard_batch({"input_ids": ids}, group, patched_layout(model))
    labels = batch.pop("labels")
    loss = sp_cross_entropy(model(**batch, use_cache=False).logits, labels, group)
    loss.backward()
    for p in model.parameters():  # SP ranks hold different tokens of the same sequence: sum their shares
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
    if step == 0:  # exact: the loss of one device on the whole sequence
        expected = reference(input_ids=ids, labels=ids).loss.item()
        assert abs(loss.item() - expected) <= 1e-5 * expected, (loss.item(), expected)
    optimizer.step()
    optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step + 1} loss {loss.item():.5f}")
dist.barrier()  # every rank done with the group before any tears it down (gloo aborts otherwise)
dist.destroy_process_group()
