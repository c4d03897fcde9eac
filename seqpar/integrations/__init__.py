"""seqpar inside other trainers: ``seqpar.integrations.hf`` for Hugging Face ``Trainer`` and TRL's ``SFTTrainer``
(docs/trainers.md). Nothing is imported here, so ``import seqpar`` never pulls transformers' Trainer or TRL."""
