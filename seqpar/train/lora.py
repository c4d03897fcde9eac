"""LongLoRA+ (Chen et al. 2024, "LongLoRA", Sec. 3.3): LoRA on the attention projections plus trainable
embeddings and normalisation layers; everything else frozen.

A LoRA-adapted linear layer computes ``x -> W0 x + (alpha / r) B A x`` with ``A [r, d_in]`` (random) and
``B [d_out, r]`` (zero at start, so training starts from the base model). LongLoRA found LoRA alone does not
adapt to long contexts; unfreezing the embeddings and norms (<2% of the weights for Llama-2-7B) closes the
gap to full fine-tuning. We use peft: LoRA through ``target_modules`` and the extras through
``modules_to_save`` (so ``save_pretrained`` writes them into the adapter's safetensors and
``merge_and_unload`` puts them back into the plain model).
"""

from __future__ import annotations

from typing import Any

from seqpar.train.recipe import LoraSection
from seqpar.train.validate import TRAINABLE_EXTRAS


def apply_lora(model: Any, lora: LoraSection) -> Any:
    """Wrap ``model`` in a peft LoRA model with LongLoRA+'s trainable extras; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        # peft matches these by suffix: "norm" catches input_layernorm, post_attention_layernorm and model.norm.
        modules_to_save=[TRAINABLE_EXTRAS[x] for x in lora.trainable] or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameter_names(model: Any) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) counts; under ZeRO-3 a partitioned parameter reports its full size (``ds_numel``)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
