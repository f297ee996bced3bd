"""plait: RLHF and RL fine-tuning of language models, from a laptop CPU to a cluster."""

__version__ = "0.1.0"
