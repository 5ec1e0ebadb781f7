"""KV-cache policies under one session: full, StreamingLLM, LongCache (ReAttention), RazorAttention."""

from .cache import FullConfig, FullPolicy, KVCacheSession, KVPolicy, StreamingConfig, StreamingPolicy
from .longcache import LongCacheConfig, LongCachePolicy
from .razor import RazorConfig, RazorPolicy

__all__ = ["FullConfig", "FullPolicy", "KVCacheSession", "KVPolicy", "LongCacheConfig", "LongCachePolicy",
           "RazorConfig", "RazorPolicy", "StreamingConfig", "StreamingPolicy"]
