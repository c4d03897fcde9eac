"""seqpar inside Hugging Face ``Trainer``: patch the model, hand it to ``SeqparTrainer``; the Trainer's own loop,
optimizer, DDP and logging do the rest. Runs on CPU as written (docs/trainers.md; tests/test_documented_commands.py
runs it):

    torchrun --nproc_per_node 2 docs/examples/hf_trainer.py

Both ranks form one SP group: every 256-token sequence is split over them (ring attention), labels are shifted
over the whole sequence before sharding, packed documents stay apart, and the logged loss of a step is the token
mean over both accumulated micro-batches. The check at the end: step 1's loss equals one device's loss on the
whole sequences (the unpatched model; LoRA's B starts at zero). TRL: ``SeqparSFTTrainer`` the same way.
"""

import copy
import tempfile

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from seqpar.integrations.hf import SeqparTrainer
from seqpar.models import patch_model
from seqpar.parallel import ParallelState

parallel = ParallelState.from_env(sp_size=2)  # torchrun's 2 ranks, one SP group (4 ranks: 2 SP x 2 DP)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
reference = copy.deepcopy(model)  # unpatched, one device, whole sequences: the check below

patch_model(model, "ring", parallel)  # before the Trainer: it reads the SP group and layout from the model
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                         task_type="CAUSAL_LM"))

rng = torch.Generator().manual_seed(1)


def sample(i: int) -> dict:
    """A 256-token SFT-style sample: no loss on a prompt of 40 + 60 i tokens (so micro-batches hold different
    numbers of targets); from sample 2 on, two packed documents (96 + 160 tokens) that never see each other."""
    ids = torch.randint(3, 260, (256,), generator=rng)
    labels = ids.clone()
    labels[: 40 + 60 * (i % 3)] = -100
    out = {"input_ids": ids.tolist(), "labels": labels.tolist()}
    if i >= 2:
        out["seq_lengths"] = [96, 160]
    return out


data = [sample(i) for i in range(8)]
args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, per_device_eval_batch_size=1,
                         gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                         train_sampling_strategy="sequential")
trainer = SeqparTrainer(model=model, args=args, train_dataset=data)  # every rank of the SP group reads samples 0, 1...
trainer.train()
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
eval_loss = trainer.evaluate(eval_dataset=data[:2])["eval_loss"]  # the token mean over the eval set

# exact: step 1 (samples 0 and 1, accumulated) is one device's token mean on the whole sequences
ids = torch.tensor([d["input_ids"] for d in data[:2]])
expected = reference(input_ids=ids, labels=torch.tensor([d["labels"] for d in data[:2]])).loss.item()
assert abs(losses[0] - expected) <= 1e-5 * expected, (losses[0], expected)
if parallel.is_main:
    print(f"losses {[round(x, 5) for x in losses]} (step 1 one device: {expected:.5f}), eval_loss {eval_loss:.5f}")
dist.barrier()  # every rank done with the group before any tears it down (gloo aborts otherwise)
dist.destroy_process_group()
