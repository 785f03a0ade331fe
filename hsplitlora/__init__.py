"""Split federated LoRA fine-tuning of Hugging Face causal LMs (SplitLoRA, HSplitLoRA)."""
