"""Learners: what learns from the text as a session reads it, attachable to any session (`Session.attach`).

  temp_lora  Temp-Lora: a temporary LoRA trained on each chunk just read, discarded when the session closes
"""

from .temp_lora import TempLora, TempLoraConfig

__all__ = ["TempLora", "TempLoraConfig"]
