"""Focused Transformer memory (LongLLaMA): the `memory` method, LongLLaMA checkpoints, CrossBatch fine-tuning."""

from .session import (
                      Memory,
                      MemoryConfig,
                      MemorySession,
                      memory_attention,
                      parse_grouping,
                      parse_mem_layers,
                      resolve_mem_layers,
                      spread_mem_layers,
)

__all__ = ["Memory", "MemoryConfig", "MemorySession", "memory_attention", "parse_grouping", "parse_mem_layers",
           "resolve_mem_layers", "spread_mem_layers"]
