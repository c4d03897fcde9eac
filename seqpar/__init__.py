"""seqpar: exact sequence parallelism and long-context fine-tuning for transformers."""

__version__ = "0.1.0"
