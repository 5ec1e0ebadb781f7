"""Training: Mini-Sequence training steps (`mst`) and the LoRA set-up (`lora`) that learners and fine-tuning
recipes share."""
