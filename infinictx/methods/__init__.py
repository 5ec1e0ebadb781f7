"""Methods: each turns a loaded model into a session. One file (or subpackage) per method, its config a dataclass
of settings (`core.registry.setting`) registered under the method's name; `temp_lora=` puts Temp-Lora on top of
any of them. Importing this package registers them all:

  temp-lora  the window with a Temp-Lora learner               ../learners/temp_lora.py
  window     the plain sliding window (the baseline)           window.py
  memory     Focused Transformer memory (LongLLaMA)            memory/
  full, streaming, longcache, razor   KV-cache policies        kv/
  rag        retrieval-augmented reading (ChatQA 2)            rag/
"""

from ..core.registry import METHODS, method_config
from ..learners.temp_lora import TempLoraConfig
from .base import MethodConfig
from .kv import FullConfig, KVCacheSession, LongCacheConfig, RazorConfig, StreamingConfig
from .memory import MemoryConfig, MemorySession
from .rag import RagConfig, RagSession
from .window import WindowConfig

__all__ = ["METHODS", "FullConfig", "KVCacheSession", "LongCacheConfig", "MemoryConfig", "MemorySession",
           "MethodConfig", "RagConfig", "RagSession", "RazorConfig", "StreamingConfig", "TempLoraConfig",
           "WindowConfig", "method_config"]
