"""Focused Transformer memory (LongLLaMA, arXiv 2307.03170): a few "memory layers" attend to the whole past.

Every layer keeps a local window of at most W recent tokens (keys and values before RoPE, rotated at positions
0..L−1 of the window on every use). When new tokens need room, the oldest local tokens leave the window: the
memory layers append their keys and values to an external memory (per layer, per KV head, in `mem_dtype`);
the other layers drop them. So the past is always split exactly in two: local window + memory.

In a memory layer each query attends to its causal local context and to the memory in ONE softmax (no learned
gate; `memory_share_tokens` is a fixed one: memory scores −log(M/N) beyond N entries), over every memory
entry ("dense", what the released LongLLaMA does) or over the k best by q·k ("topk", the paper's kNN; exact,
with faiss for large memories, torch for small). Memory keys are rotated

  first     as if at position 0, the first position of the local window (LongLLaMA's `mem_positionals`)
  distance  as if at distance W from every query (InfLLM: the query is rotated at W, the key at 0)
  window    with the rotation they had at their last local position in the window
  none      no RoPE at all in the memory layers (LongLLaMA's mem_positionals=False, its small-model setting)

Which layers read memory: a checkpoint's own `mem_layers`, else "auto": the 40% of layers whose strongest head
is an echo or induction head by RazorAttention's probe (`infinictx/analysis/heads.py`). LongLLaMA's three spread layers
(`"spread"`) suit a model trained with them; a small model copies from memory only where its copying heads
are (SmolLM2-135M: passkey 0% beyond the window with layers 8, 15, 22, even after CrossBatch; with its 12
retrieval layers and 30 minutes of CrossBatch, 100% up to 16K tokens).

Peak memory is bounded by computing the memory attention in blocks of query heads × queries (LongLLaMA's
`mem_attention_grouping`); by default the block size keeps the score matrix under ~256 MiB.

Scoring a chunk sees: W−Δ local tokens (the `window` method's context) plus the memory, so `--compare-base`
(the plain window, same inputs) measures what the memory adds. By default (`local_context="reread"`) those W−Δ
tokens are re-read in the chunk's forward, as the window method reads them: with the memory capped at 0 tokens
(`memory_tokens`; the oldest past leaves a capped memory first) the session is exactly the window method, and
the memory can only add. With `"cache"` the chunk attends to the local keys as computed when they were read (half
the forward work); capped at 0 that is StreamingLLM without sink tokens, and once the stream's first tokens have
left the window, perplexity rises (6K tokens of Paradise Lost, `smollm2-fot`: 88.5 with the whole memory, 119
without, against 69.8 re-read and the window's 71.7). Generation goes on from the cached window, token by token;
a token enters memory with the keys and values it got when it was read. Temp-Lora goes on top like on any
method (`temp_lora=`): the memory keeps the past's keys and values, the adapter learns from each chunk.

LongLLaMA checkpoints load with their memory settings (`longllama.py`); CrossBatch fine-tuning teaches a model to
use the memory (`crossbatch.py`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ...analysis.heads import retrieval_layers
from ...core import native
from ...core.attention import (
    KVBuffer,
    LocalKV,
    Rope,
    RotatedWindow,
    additive_causal_mask,
    base_causal_lm,
    causal_mask,
    check_supported,
    decoder_forward,
    local_attention,
)
from ...core.errors import InfinictxError
from ...core.kernels import Bf16KeyCopy, Int8KeyCopy, Scratch, matmul_heads, weighted_rows
from ...core.models import DTYPES, LoadedModel
from ...core.registry import register_method, setting
from ...core.session import Capabilities, StatefulSession, check_window
from ..base import MethodConfig

POSITIONALS = ("first", "distance", "window", "none")
LOOKUPS = ("dense", "topk")
KERNELS = ("fast", "reference")
LOCAL_CONTEXTS = ("reread", "cache")
SCORE_BUDGET_BYTES = 256 << 20
# lookups of at most this many rows per KV head (decode steps, short chunks) read the bf16 copy of the memory keys;
# a prefill chunk's hundreds of rows are matmul-bound, not bound by reading the keys
BF16_LOOKUP_MAX_ROWS = 16
# lookups of more rows (prefill chunks) score the memory with AMX int8 tiles from this many keys on (and 16·k: the
# selection's bound needs k blocks of 16); below, the fp32 matmul and the native top-k are as fast
INT8_LOOKUP_MIN_KEYS = 2048
INT8_HEAD_DIMS = (32, 64)   # what the tile kernel takes


def _bf16_lookup_here() -> bool:
    """The bf16 lookup copy pays where the native kernels run vectorised (AVX-512)."""
    return native.has_avx512()


def _int8_lookup_here() -> bool:
    """The int8 lookup copy needs AMX tiles (`native.has_amx`); `INFINICTX_AMX=0` turns it off."""
    return os.environ.get("INFINICTX_AMX", "1") != "0" and native.has_amx()


def spread_mem_layers(n_layers: int) -> list[int]:
    """Three memory layers spread over the depth, as LongLLaMA-3B (layers 6, 12, 18 of 26)."""
    return sorted({min(n_layers - 1, round(n_layers * j / 4)) for j in (1, 2, 3)})


def parse_mem_layers(text: str | None):
    """A memory-layer spec as typed: None, "auto[:N]" / "spread" (kept as text), or comma-separated indices."""
    if text is None or text.split(":")[0] in ("auto", "spread"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InfinictxError(f"--mem-layers must be comma-separated integers, 'auto[:N]' or 'spread'; got {text!r}")


def parse_grouping(text: str) -> tuple[int, int]:
    """"HEADS,QUERIES" -> (heads, queries)."""
    try:
        grouping = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        grouping = ()
    if len(grouping) != 2:
        raise InfinictxError("--grouping takes two numbers: HEADS,QUERIES")
    return grouping


def resolve_mem_layers(spec, lm: LoadedModel) -> list[int]:
    """Memory layer indices from a spec: a list of indices, "spread" (LongLLaMA's three layers), or "auto" /
    "auto:N" (default N = 40% of the layers): the N layers holding the strongest echo/induction heads
    (`heads.retrieval_layers`). Why auto is the default: training-free, SmolLM2-135M copies a code out of
    memory when its 12 auto layers read it (NLL per digit 4.16 → 0.81) and not with three spread layers
    (4.06 → 4.13): a small model's copying circuit lives in a few layers, not at every eighth."""
    model = base_causal_lm(lm.model)
    n_layers = model.config.num_hidden_layers
    if isinstance(spec, str):
        name, _, count = spec.partition(":")
        if name == "spread" and not count:
            return spread_mem_layers(n_layers)
        if name == "auto":
            try:
                n = int(count) if count else max(1, round(0.4 * n_layers))
            except ValueError:
                n = 0
            if not 1 <= n <= n_layers:
                raise InfinictxError(f"memory layers 'auto:N' needs 1 <= N <= {n_layers}; got {spec!r}")
            return retrieval_layers(model, n, bos_id=lm.tokenizer.bos_token_id)
        raise InfinictxError(f"memory layers must be indices (e.g. 8,15,22), 'spread' or 'auto[:N]'; got {spec!r}")
    return list(spec)


@register_method("memory")
@dataclass
class MemoryConfig(MethodConfig):
    window: int | None = setting(None, "W: local window (default: the checkpoint's last_context_length, else 1024)",
                                 short="-W")
    chunk: int | None = setting(None, "Δ: tokens processed per step (default W/2)", short="-D")
    mem_layers: tuple | list | str | None = setting(
        None, "memory layer indices (e.g. 8,15,22), 'auto[:N]' (the N layers with the strongest retrieval heads; "
        "N = 40% of layers) or 'spread' (3 layers, LongLLaMA) (default: the checkpoint's, else auto)",
        parse=parse_mem_layers)
    positionals: str | None = setting(None, "RoPE of memory keys: as if first in the window, at distance W, as "
                                      "last rotated in the window, or none (default: the checkpoint's, else first)",
                                      choices=POSITIONALS)
    lookup: str = setting("dense", "all memory entries or the top k", choices=LOOKUPS)
    topk: int = setting(128, "k of the top-k lookup (the paper's value)")
    memory_tokens: int | None = setting(None, "at most this many past tokens in memory, the oldest leaving first "
                                        "(0: no memory; default: the whole past)")
    # a fixed gate, for memories larger than the model learned to read: dense memory attention over M entries
    # gives the memory a share of the softmax that grows with M (smollm2-fot on Paradise Lost, 32K tokens read:
    # PPL 71.1 with 8K tokens in memory, 72.2 with 32K; top-128 lookups worse still)
    memory_share_tokens: int | None = setting(None, "beyond this many memory entries, every memory score gets "
                                              "−log(M / N): the memory's weight in the softmax stops growing with "
                                              "its size M (0: off; default: the checkpoint's, else off)")
    # reread by default: with cached local keys (no attention sink once the stream's first tokens leave) memory
    # reading cost perplexity (smollm2-fot, 6K tokens of Paradise Lost: 88.5 vs the window's 71.7); re-read, 69.8
    local_context: str = setting("reread", "how a chunk sees its W−Δ local tokens: re-read with it, as the window "
                                 "method does (2x the forward work), or their keys as cached when they were read",
                                 choices=LOCAL_CONTEXTS)
    mem_dtype: str | None = setting(None, "dtype of the stored memory (default: the model's, or the checkpoint's)")
    grouping: tuple | list | None = setting(None, "HEADS,QUERIES: memory attention in blocks of query heads × "
                                            "queries, bounding peak memory (default automatic)", parse=parse_grouping)
    faiss_min: int = setting(16384, "reference kernel: top-k via faiss from this memory size on (exact "
                             "inner-product search)")
    # identity=False: both kernels compute the same attention (tests hold them to 1e-4 logits, same top-k sets)
    kernel: str = setting("fast", "memory lookup kernel: fast (top-k: reused score buffers, weighted rows "
                          "gathered by embedding_bag, no faiss; dense: one fused attention over memory and local "
                          "keys) or reference (the original path, kept to check against)",
                          choices=KERNELS, identity=False)
    # decoding reads every memory key per token (302 MB at 32K in fp32); the copy halves that, and small native calls
    # on the calling thread did the rest: benchmarks/results/long_decode_amx.md
    decode_copy: bool = setting(True, "fast top-k kernel: the memory keys kept again in bf16 for decode lookups "
                                "(the same top-k: candidates re-scored in fp32; +26% memory bytes)",
                                flag="--no-decode-copy", identity=False)
    # a prefill chunk's lookups score every memory key for hundreds of rows: AMX int8 tiles do it in fewer
    # instructions than the fp32 matmul, and the exact top-k comes from their bound without the fp32 score matrix
    prefill_copy: bool = setting(True, "fast top-k kernel on a CPU with AMX: the memory keys kept again as int8 parts "
                                 "for prefill lookups (the same top-k: candidates re-scored in fp32; +28% memory "
                                 "bytes)", flag="--no-prefill-copy", identity=False)

    def validate(self):
        if self.window is not None:
            check_window(self.window, self.chunk if self.chunk is not None else max(1, self.window // 2))
        elif self.chunk is not None and self.chunk < 1:
            raise InfinictxError(f"chunk ({self.chunk}) must be >= 1")
        if isinstance(self.mem_layers, str):
            name, _, count = self.mem_layers.partition(":")
            if name not in ("auto", "spread") or (name == "spread" and count):
                raise InfinictxError(f"memory layers must be indices (e.g. 8,15,22), 'spread' or 'auto[:N]'; "
                                     f"got {self.mem_layers!r}")
        if self.positionals is not None and self.positionals not in POSITIONALS:
            raise InfinictxError(f"unknown memory positionals {self.positionals!r}; choose one of "
                                 f"{', '.join(POSITIONALS)}")
        if self.lookup not in LOOKUPS:
            raise InfinictxError(f"unknown memory lookup {self.lookup!r}; choose one of {', '.join(LOOKUPS)}")
        if self.topk < 1:
            raise InfinictxError(f"top-k must be >= 1 (got {self.topk})")
        if self.local_context not in LOCAL_CONTEXTS:
            raise InfinictxError(f"unknown local context {self.local_context!r}; choose one of "
                                 f"{', '.join(LOCAL_CONTEXTS)}")
        if self.memory_share_tokens is not None and self.memory_share_tokens < 0:
            raise InfinictxError(f"--memory-share-tokens must be >= 0 (0: off; got {self.memory_share_tokens})")
        if self.memory_tokens is not None and self.memory_tokens < 0:
            raise InfinictxError(f"--memory-tokens must be >= 0 (got {self.memory_tokens})")
        if self.kernel not in KERNELS:
            raise InfinictxError(f"unknown memory kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        if self.mem_dtype is not None and self.mem_dtype not in DTYPES:
            raise InfinictxError(f"unknown memory dtype {self.mem_dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.grouping is not None:
            g = tuple(int(x) for x in self.grouping)
            if len(g) != 2 or min(g) < 1:
                raise InfinictxError(f"memory attention grouping must be two positive numbers (heads, queries); "
                                     f"got {self.grouping}")
            self.grouping = g

    def resolved(self, lm: LoadedModel) -> "MemoryConfig":
        """Fill the unset fields from the checkpoint (a LongLLaMA config) or the defaults, and validate the
        settings that depend on the model."""
        ckpt = getattr(lm, "memory", None) or {}
        n_layers = base_causal_lm(lm.model).config.num_hidden_layers
        window = self.window if self.window is not None else ckpt.get("last_context_length") or 1024
        cfg = MemoryConfig(
            window=window, chunk=self.chunk if self.chunk is not None else max(1, window // 2),
            mem_layers=resolve_mem_layers(self.mem_layers if self.mem_layers is not None
                                          else ckpt.get("mem_layers", "auto"), lm),
            positionals=self.positionals or ckpt.get("positionals", "first"), lookup=self.lookup, topk=self.topk,
            memory_tokens=self.memory_tokens,
            memory_share_tokens=(self.memory_share_tokens if self.memory_share_tokens is not None
                                 else ckpt.get("memory_share_tokens")) or None,
            local_context=self.local_context,
            mem_dtype=self.mem_dtype or ckpt.get("mem_dtype") or str(lm.dtype).split(".")[-1],
            grouping=self.grouping if self.grouping is not None else ckpt.get("grouping"),
            faiss_min=self.faiss_min, kernel=self.kernel, decode_copy=self.decode_copy,
            prefill_copy=self.prefill_copy, temp_lora=self.temp_lora)
        bad = [i for i in cfg.mem_layers if not 0 <= int(i) < n_layers]
        if bad:
            raise InfinictxError(f"memory layers {bad} out of range: the model has {n_layers} layers "
                                 f"(0..{n_layers - 1})")
        cfg.mem_layers = sorted({int(i) for i in cfg.mem_layers})
        return cfg

    def new_session(self, lm: LoadedModel) -> "MemorySession":
        check_supported(lm.model)   # before `resolved`: "auto" memory layers run the model's own layers
        return MemorySession(lm, self.resolved(lm))


class Memory(KVBuffer):
    """One memory layer's external memory: keys and values (B, Hkv, M, D) of every token that left the local
    window (a growing `KVBuffer`). For top-k lookups on large memories (batch 1) it also keeps one exact
    inner-product faiss index per KV head, built once the memory reaches `faiss_min` entries."""

    def __init__(self, dtype: torch.dtype, faiss_min: int | None = 16384, bf16_copy: bool = False,
                 int8_copy: bool = False):
        super().__init__(dtype)
        self.faiss_min = faiss_min
        self.indexes = None
        # the fast kernel's decode lookups (few rows, fp32 keys, batch 1): the keys again in bf16 (`Bf16KeyCopy`)
        self.bf16_copy = Bf16KeyCopy() if bf16_copy else None
        # its prefill lookups (many rows) on a CPU with AMX: the keys again as int8 parts (`Int8KeyCopy`)
        self.int8_copy = Int8KeyCopy() if int8_copy else None

    def __setstate__(self, state: dict):
        self.__dict__.update(state)
        self.__dict__.setdefault("bf16_copy", None)   # saved by a version without the copies
        self.__dict__.setdefault("int8_copy", None)

    def nbytes(self) -> int:
        return super().nbytes() + sum(c.nbytes() for c in (self.bf16_copy, self.int8_copy) if c is not None)

    def append(self, k: torch.Tensor, v: torch.Tensor):
        super().append(k, v)
        n = k.shape[2]
        one_fp32 = k.shape[0] == 1 and self.k.dtype == torch.float32
        if self.bf16_copy is not None:
            if one_fp32:
                self.bf16_copy.append(self.k[0, :, self.size - n:self.size])
            else:
                self.bf16_copy = None
        if self.int8_copy is not None:
            if one_fp32:
                self.int8_copy.append(self.k[0, :, :self.size], n)
            else:
                self.int8_copy = None
        if self.indexes is not None:
            self._index_add(self.size - n, self.size)
        elif self.faiss_min is not None and self.size >= self.faiss_min and k.shape[0] == 1:
            self._build_indexes()

    def keep_last(self, n: int):
        """Forget all but the newest n entries (a capped memory: the oldest past leaves first)."""
        drop = self.size - n
        if drop <= 0:
            return
        if n:
            self.k[:, :, :n] = self.k[:, :, drop:self.size].clone()
            self.v[:, :, :n] = self.v[:, :, drop:self.size].clone()
        self.size = n
        if self.indexes is not None:
            self._build_indexes()
        if self.bf16_copy is not None:   # rebuilt from the kept keys
            self.bf16_copy = Bf16KeyCopy()
            if n:
                self.bf16_copy.append(self.k[0, :, :n])
        if self.int8_copy is not None:
            self.int8_copy = Int8KeyCopy()
            if n:
                self.int8_copy.append(self.k[0, :, :n], n)

    def copy(self) -> "Memory":
        other = super().copy()
        if self.bf16_copy is not None:
            other.bf16_copy = self.bf16_copy.copy()
        if self.int8_copy is not None:
            other.int8_copy = self.int8_copy.copy()
        if self.indexes is not None:
            import faiss

            other.indexes = [faiss.clone_index(ix) for ix in self.indexes]
        return other

    def _build_indexes(self):
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        self.indexes = [faiss.IndexFlatIP(self.k.shape[3]) for _ in range(self.k.shape[1])]
        self._index_add(0, self.size)

    def _index_add(self, start: int, end: int):
        # faiss holds float32 copies of the keys as stored (after the mem_dtype rounding), so both lookups agree.
        for h, index in enumerate(self.indexes):
            index.add(np.ascontiguousarray(self.k[0, h, start:end].float().cpu().numpy()))

    def top_k(self, q: torch.Tensor, h0: int, h1: int, k: int, scale: float):
        """Best k entries by q·k for queries q (B, h1−h0, R, D) of KV heads h0..h1−1: (scaled scores, indices),
        both (B, h1−h0, R, k)."""
        if self.indexes is not None and q.shape[0] == 1:
            scores, idx = [], []
            for j, h in enumerate(range(h0, h1)):
                s, i = self.indexes[h].search(np.ascontiguousarray(q[0, j].float().cpu().numpy()), k)
                scores.append(torch.from_numpy(s))
                idx.append(torch.from_numpy(i))
            return ((torch.stack(scores)[None] * scale).to(q.device, q.dtype), torch.stack(idx)[None].to(q.device))
        s = q @ self.keys()[:, h0:h1].to(q.dtype).transpose(-1, -2)
        vals, idx = s.topk(k, dim=-1)
        return vals * scale, idx


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mem: torch.Tensor, memory: Memory,
                     scale: float, lookup: str = "dense", topk: int = 128, grouping: tuple | None = None,
                     scratch: Scratch | None = None, mem_bias: float = 0.0) -> torch.Tensor:
    """One softmax over [memory ‖ causal local context], `mem_bias` added to every memory score.

    q (B, Hq, T, D): queries rotated at their local positions; q_mem: the queries as rotated for memory keys;
    k, v (B, Hkv, L, D): local keys (rotated) and values, the queries being the last T of the L positions.
    Computed in blocks of (query heads, queries) so the score matrix stays bounded. Returns (B, Hq, T, D).

    With a `scratch` buffer (the fast kernel), a top-k lookup takes `_topk_block` (the same scores, the same
    top-k, the same softmax, in fewer passes over memory) and a dense lookup `_dense_fused` (one fused attention
    call over [memory ‖ local]; it blocks internally, so `grouping` does not apply)."""
    if lookup == "dense" and scratch is not None and len(memory):
        return _dense_fused(q, k, v, q_mem, memory, scale, mem_bias, scratch)
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g = Hq // Hkv
    M = len(memory)
    kk = min(topk, M)
    width = (kk if lookup == "topk" else M) + L
    if grouping is None:  # automatic: the whole head set, as many queries as fit the budget
        heads_per_block = Hkv
        row_bytes = 4 * B * Hq * max(width + (M if lookup == "topk" else 0), 1)
        q_per_block = max(1, min(T, SCORE_BUDGET_BYTES // row_bytes))
    else:
        heads_per_block = max(1, grouping[0] // g)
        q_per_block = grouping[1]
    mask = causal_mask(T, L, q.device)
    qv, qmv = q.view(B, Hkv, g, T, D), q_mem.view(B, Hkv, g, T, D)
    out = q.new_empty(B, Hkv, g, T, D)
    for h0 in range(0, Hkv, heads_per_block):
        h1 = min(Hkv, h0 + heads_per_block)
        nh = h1 - h0
        k_loc, v_loc = k[:, h0:h1], v[:, h0:h1]
        if lookup == "dense":
            k_mem = memory.keys()[:, h0:h1].to(q.dtype)
            v_mem = memory.values()[:, h0:h1].to(q.dtype)
        for t0 in range(0, T, q_per_block):
            t1 = min(T, t0 + q_per_block)
            tq = t1 - t0
            qq = qv[:, h0:h1, :, t0:t1].reshape(B, nh, g * tq, D)
            qm = qmv[:, h0:h1, :, t0:t1].reshape(B, nh, g * tq, D)
            if lookup == "topk" and scratch is not None and mask is None:
                # nothing masked (a decode step): the local scores are left to `_topk_block` (natively, for a few rows)
                o = _topk_block(qm, None, v_loc, memory, h0, h1, kk, scale, scratch, mem_bias, (qq, k_loc))
                out[:, h0:h1, :, t0:t1] = o.view(B, nh, g, tq, D)
                continue
            s_loc = torch.matmul(qq, k_loc.transpose(-1, -2)).mul_(scale)   # in place: no extra copies
            if mask is not None:  # rows are (query head in group, query): the same mask for each head; only the
                # last T keys (the new tokens) are ever masked
                s_loc[..., L - T:].masked_fill_(~mask[t0:t1, L - T:].repeat(g, 1), float("-inf"))
            if lookup == "topk" and scratch is not None:
                o = _topk_block(qm, s_loc, v_loc, memory, h0, h1, kk, scale, scratch, mem_bias)
                out[:, h0:h1, :, t0:t1] = o.view(B, nh, g, tq, D)
                continue
            if lookup == "dense":
                s_mem = (qm @ k_mem.transpose(-1, -2)) * scale
            else:
                s_mem, idx = memory.top_k(qm, h0, h1, kk, scale)
            if mem_bias:
                s_mem = s_mem + mem_bias
            p = torch.softmax(torch.cat([s_mem, s_loc], dim=-1).float(), dim=-1).to(q.dtype)
            p_mem, p_loc = p[..., :s_mem.shape[-1]], p[..., s_mem.shape[-1]:]
            o = p_loc @ v_loc
            if lookup == "dense":
                o = o + p_mem @ v_mem
            else:
                bi = torch.arange(B, device=q.device)[:, None, None, None]
                hi = torch.arange(h0, h1, device=q.device)[None, :, None, None]
                v_sel = memory.v[bi, hi, idx].to(q.dtype)            # (B, nh, R, k, D)
                o = o + (p_mem.unsqueeze(-2) @ v_sel).squeeze(-2)
            out[:, h0:h1, :, t0:t1] = o.view(B, nh, g, tq, D)
    return out.view(B, Hq, T, D)


def _dense_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_mem: torch.Tensor, memory: Memory,
                 scale: float, mem_bias: float = 0.0, scratch: Scratch | None = None) -> torch.Tensor:
    """Dense memory attention as one `scaled_dot_product_attention` over the keys [memory ‖ local] (memory
    visible to every query, local keys causal): the fused kernel never holds the (queries × keys) score matrix
    and runs at matmul speed (a 1024-query chunk over 8K memory entries: ~4x faster than the blocked softmax).
    When the memory's queries differ from the local ones (a rotation of their own), both go in one query of
    twice the head size, [q ‖ q_mem], against keys [k ‖ 0] (local) and [0 ‖ k_mem] (memory): each key meets
    only its own query half, exactly (the zero half adds exact zeros)."""
    T, L = q.shape[2], k.shape[2]
    k_mem, v_mem = memory.keys(), memory.values()
    if k_mem.dtype != q.dtype:
        k_mem, v_mem = k_mem.to(q.dtype), v_mem.to(q.dtype)
    M = k_mem.shape[2]
    if q_mem is not q:
        q = torch.cat([q, q_mem], -1)
        k_mem = torch.cat([torch.zeros_like(k_mem), k_mem], -1)
        k = torch.cat([k, torch.zeros_like(k)], -1)
    keys, values = torch.cat([k_mem, k], 2), torch.cat([v_mem, v], 2)

    def build_mask():
        # additive (a boolean one is converted to this inside every call): the bias on the memory columns, −inf
        # on the local keys a query may not see
        if T == 1 and not mem_bias:
            return None
        mask = torch.zeros(T, M + L, dtype=q.dtype, device=q.device)
        mask[:, :M] = mem_bias
        if T > 1:
            mask[:, M:] = additive_causal_mask(T, L, q.device, q.dtype)
        return mask

    # every memory layer of one forward has the same sizes and bias: build the mask once for all of them
    key = (T, M, L, mem_bias, q.dtype, q.device)
    mask = scratch.cached(key, build_mask) if scratch is not None else build_mask()
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def _topk_block(qm: torch.Tensor, s_loc: torch.Tensor | None, v_loc: torch.Tensor, memory: Memory, h0: int, h1: int,
                k: int, scale: float, scratch: Scratch, mem_bias: float = 0.0,
                local: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The fast top-k kernel for one block of rows: qm (B, nh, R, D) queries for the memory keys of KV heads
    h0..h1−1, s_loc (B, nh, R, L) their scaled, masked local scores, or None with local = (queries (B, nh, R, D),
    local keys (B, nh, L, D)) when every local key is visible. The memory scores go into a reused buffer,
    the top-k is the native row-wise kernel (`core.native`; torch's where it cannot be built), the joint softmax is
    taken unnormalised (one max, one sum: no concatenated score matrix), and the k value rows are summed with their
    weights by `embedding_bag` instead of being gathered into a (R, k, D) tensor first."""
    B, nh, R, _ = qm.shape
    keys = memory.keys()[:, h0:h1]
    found = None
    copy = memory.bf16_copy
    if (copy is not None and len(copy) == len(memory) and R <= BF16_LOOKUP_MAX_ROWS and len(memory) >= 32 * k
            and qm.dtype == torch.float32 and B == 1):
        # decoding: the bf16 copy's scores find the candidates, fp32 re-scores them (the same top-k)
        found = copy.top_k(qm[0], keys[0], h0, h1, k)
        if found is not None:
            vals, idx = found[0][None], found[1][None]
    int8 = memory.int8_copy
    if (found is None and int8 is not None and len(int8) == len(memory) and R > BF16_LOOKUP_MAX_ROWS
            and len(memory) >= max(INT8_LOOKUP_MIN_KEYS, 16 * k) and qm.dtype == torch.float32 and B == 1):
        # a prefill chunk: the int8 copy's AMX tile scores find the candidates, fp32 re-scores them (the same top-k)
        found = int8.top_k(qm[0], keys[0], h0, h1, k)
        if found is not None:
            vals, idx = found[0][None], found[1][None]
    if found is None:
        if keys.dtype != qm.dtype:
            keys = keys.to(qm.dtype)
        s = scratch.get((B, nh, R, keys.shape[2]), qm.dtype, qm.device)
        matmul_heads(qm, keys.transpose(-1, -2), s)
        if s.dtype == torch.float32 and s.device.type == "cpu" and native.available():
            # 2-4x faster than torch.topk from 2K to 16K keys; ties to the earlier key
            vals, idx = native.topk_rows(s, k)
        else:
            vals, idx = s.topk(k, dim=-1)
    if (B == 1 and R <= BF16_LOOKUP_MAX_ROWS and qm.dtype == torch.float32 and qm.device.type == "cpu"
            and native.available()):
        # a few rows (decoding): local scores, softmax and both weighted sums in one native pass per row (~20 torch
        # ops and an embedding_bag per head were ~1/3 of a decode step's memory-layer time outside the lookup)
        values = memory.values()[0, h0:h1]
        ok = [values, v_loc] + ([s_loc] if s_loc is not None else list(local))
        if all(x.dtype == torch.float32 and x.stride(-1) == 1 for x in ok):
            if s_loc is not None:
                return native.decode_attend(vals[0], idx[0], scale, mem_bias, values, v_loc[0], s_loc=s_loc[0])[None]
            return native.decode_attend(vals[0], idx[0], scale, mem_bias, values, v_loc[0], q_loc=local[0][0],
                                        k_loc=local[1][0])[None]
    if s_loc is None:
        s_loc = torch.matmul(local[0], local[1].transpose(-1, -2)).mul_(scale)
    s_mem = vals.mul_(scale)
    if mem_bias:
        s_mem.add_(mem_bias)
    top = torch.maximum(s_mem.amax(-1, keepdim=True), s_loc.amax(-1, keepdim=True))
    e_mem, e_loc = s_mem.sub_(top).exp_(), s_loc.sub_(top).exp_()   # s_loc is this block's own: overwritten
    total = e_mem.sum(-1, keepdim=True) + e_loc.sum(-1, keepdim=True)
    o = torch.matmul(e_loc, v_loc).add_(weighted_rows(memory.values()[:, h0:h1], idx, e_mem))
    return o.div_(total)


class MemorySession(StatefulSession):
    """A stream read through a local window of W tokens plus a FoT memory in the memory layers."""

    def __init__(self, lm: LoadedModel, config: MemoryConfig):
        super().__init__(lm, config, config.window, config.chunk)
        check_supported(lm.model)
        cfg = base_causal_lm(self.model).config
        self.n_layers = cfg.num_hidden_layers
        self.mem_dtype = DTYPES[config.mem_dtype]
        self.rope = Rope(self.model, lm.device, lm.dtype)
        self.local = self._new_local()
        self.local_ids = torch.zeros(0, dtype=torch.long)   # the tokens whose keys the local windows hold
        self.memory = {i: self._new_memory() for i in config.mem_layers}
        self.scratch = Scratch() if config.kernel == "fast" else None
        # called as on_lookup(layer, q, k, q_mem, memory, scale) before each memory layer's attention (q, k: the
        # rotated queries and local keys; q_mem: the queries that score memory): a seam for tracing lookups
        self.on_lookup = None

    @property
    def capabilities(self) -> Capabilities:
        # base = the plain sliding window over the same W−Δ local tokens
        return replace(super().capabilities, base_variant=True)

    def _new_local(self) -> list:
        # fast kernel: windows kept rotated in buffers with room for a chunk and 256 steps before compacting
        if self.config.kernel == "fast":
            return [RotatedWindow(self.window + self.chunk + 256) for _ in range(self.n_layers)]
        return [LocalKV() for _ in range(self.n_layers)]

    def _new_memory(self) -> Memory:
        # faiss only serves the reference kernel's top-k lookups (the fast kernel is as fast without an index to
        # build and copy at every fork); a dense lookup reads every entry anyway
        cfg = self.config
        faiss = cfg.lookup == "topk" and cfg.kernel == "reference"
        # the fast kernel's decode lookups read a bf16 copy of the keys (exact: candidates re-scored in fp32)
        bf16_copy = (cfg.decode_copy and cfg.lookup == "topk" and cfg.kernel == "fast"
                     and self.mem_dtype == torch.float32 and self.device.type == "cpu" and _bf16_lookup_here())
        # and its prefill lookups, on a CPU with AMX, an int8 copy (exact the same way)
        int8_copy = (cfg.prefill_copy and cfg.lookup == "topk" and cfg.kernel == "fast"
                     and self.mem_dtype == torch.float32
                     and self.device.type == "cpu" and self.meter.shape.head_dim in INT8_HEAD_DIMS
                     and _int8_lookup_here())
        return Memory(self.mem_dtype, cfg.faiss_min if faiss else None, bf16_copy, int8_copy)

    def _memory_bias(self, memory: Memory) -> float:
        n = self.config.memory_share_tokens
        return -math.log(len(memory) / n) if n and len(memory) > n else 0.0

    # --- the forward over new tokens --------------------------------------------------------------------
    def _make_room(self, n_new: int):
        """Move the oldest local tokens out so that the window holds W − n_new of them: to memory in the memory
        layers, dropped elsewhere."""
        n_out = len(self.local[0]) + n_new - self.window
        if n_out <= 0:
            return
        self.local_ids = self.local_ids[n_out:]
        cap = self.config.memory_tokens
        for i, local in enumerate(self.local):
            k_old, v_old = local.pop_oldest(n_out)
            if i in self.memory and cap != 0:
                if self.config.positionals == "window":
                    k_old = self.rope.rotate(k_old, 0)
                if cap is not None and k_old.shape[2] > cap:
                    k_old, v_old = k_old[:, :, -cap:], v_old[:, :, -cap:]
                self.memory[i].append(k_old, v_old)
                if cap is not None:
                    self.memory[i].keep_last(cap)

    def _process(self, tokens: torch.Tensor, commit: bool, all_logits: bool) -> torch.Tensor:
        """Run `tokens` (≤ W − 1 of them) after everything processed so far; return their logits (T, V), or
        only the last position's (1, V). With commit=False nothing about the past changes (except that tokens
        may move from the local window into memory, which does not change what the past is)."""
        if self.config.local_context == "reread" and len(tokens) > 1:
            logits = self._reread(tokens, commit)[1]
            return logits if all_logits else logits[-1:]
        return self._cached(tokens, commit, all_logits)

    def _scored(self, chunk: torch.Tensor, commit: bool) -> torch.Tensor:
        if self.config.local_context != "reread" or len(chunk) < 2:
            return super()._scored(chunk, commit)
        first, logits = self._reread(chunk, commit)   # `first`, from the last context token, predicts chunk[0]
        if commit:
            self._last_logits = logits[-1].float()
        chunk = chunk.to(logits.device)
        if first is None:  # stream start: the first token has no prediction
            return F.cross_entropy(logits[:-1].float(), chunk[1:], reduction="none")
        return F.cross_entropy(torch.cat([first[None], logits[:-1]]).float(), chunk, reduction="none")

    def _reread(self, tokens: torch.Tensor, commit: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Read `tokens` after their local context re-read with them in one forward (positions 0..L−1, as the
        window method reads a chunk), the memory layers also attending to the memory. Returns (logits of the
        last context token, or None when there is none; logits of the tokens). Committing keeps the tokens' keys
        and values from this forward in the local windows: what goes to memory when they leave."""
        T = len(tokens)
        self._make_room(max(T, self.chunk))   # W−Δ tokens of context even for a short chunk (as the window method)
        C = len(self.local_ids)
        ids = torch.cat([self.local_ids, tokens.cpu()])
        cfg = self.config

        def attend(i, a, q, k, v):
            memory = self.memory.get(i)
            if commit:
                self.local[i].with_new(k[:, :, C:], v[:, :, C:], self.rope)
                self.local[i].commit(T)
            if memory is not None and cfg.positionals == "none":
                qr, kr = q, k
            else:
                qr, kr = self.rope.rotate(q, 0), self.rope.rotate(k, 0)
            if memory is None or not len(memory):
                return local_attention(qr, kr, v, a.scaling)
            if cfg.positionals == "distance":
                qm = self.rope.rotate_at(q, torch.full((len(ids),), self.window, device=q.device))
            else:
                qm = qr
            if self.on_lookup is not None:
                self.on_lookup(i, qr, kr, qm, memory, a.scaling)
            return memory_attention(qr, kr, v, qm, memory, a.scaling, cfg.lookup, cfg.topk, cfg.grouping,
                                    self.scratch, self._memory_bias(memory))

        logits = decoder_forward(self.model, ids.to(self.device)[None], attend, logits_to_keep=T + (C > 0))[0]
        if commit:
            self.local_ids = torch.cat([self.local_ids, tokens.cpu()])
        self._account(len(ids), 0, T + (C > 0))
        return (logits[0], logits[1:]) if C else (None, logits)

    def _cached(self, tokens: torch.Tensor, commit: bool, all_logits: bool) -> torch.Tensor:
        """`_process` over the local windows' cached keys: each token attends to the keys computed when the
        window's tokens were read."""
        T = len(tokens)
        self._make_room(T)
        cached = len(self.local[0])
        cfg = self.config

        def attend(i, a, q, k, v):
            memory = self.memory.get(i)
            kr, v_all, k_all, slot = self.local[i].with_new(k, v, self.rope)
            n = kr.shape[2]
            if memory is not None and cfg.positionals == "none":
                qr, kr = q, k_all
            else:
                qr = self.rope.rotate(q, slot)   # a rotated window's slot: same distances to every key
            if memory is not None and len(memory):
                if cfg.positionals == "distance":
                    qm = self.rope.rotate_at(q, torch.full((T,), self.window, device=q.device))
                elif cfg.positionals == "none" or slot == n - T:
                    qm = qr
                else:   # memory keys sit at position 0 ("first") or carry their own rotation: local positions
                    qm = self.rope.rotate(q, n - T)
                if self.on_lookup is not None:
                    self.on_lookup(i, qr, kr, qm, memory, a.scaling)
                out = memory_attention(qr, kr, v_all, qm, memory, a.scaling, cfg.lookup, cfg.topk, cfg.grouping,
                                       self.scratch, self._memory_bias(memory))
            else:
                out = local_attention(qr, kr, v_all, a.scaling)
            if commit:
                self.local[i].commit(T)
            return out

        logits = decoder_forward(self.model, tokens.to(self.device)[None], attend,
                                 logits_to_keep=None if all_logits else 1)[0]
        if commit:
            self.local_ids = torch.cat([self.local_ids, tokens.cpu()])
        self._account(T, cached, T if all_logits else 1)
        return logits

    def _account(self, n: int, cached: int, n_logits: int):
        self.meter.add_forward(n, cached, n_logits, self.lora_rank)
        s = self.meter.shape
        for memory in self.memory.values():
            m = len(memory)
            looked_up = min(self.config.topk, m) if self.config.lookup == "topk" else m
            # scores against every entry (top-k still scores all of them), weighted sum over those looked up
            flops = 2 * n * s.heads * s.head_dim * (m + looked_up)
            self.meter.flops["forward"] += flops
            self.meter.flops["attention"] += flops

    def kv_bytes(self) -> int:
        """Bytes of keys and values held: every layer's local window plus the memories."""
        return sum(x.nbytes() for x in self.local) + sum(m.nbytes() for m in self.memory.values())

    def _fork_state(self, other: "MemorySession"):
        # plain local caches are shared (never modified in place), rotated windows and memories copied
        other.local = [x.copy(self.rope) for x in self.local]
        other.local_ids = self.local_ids.clone()
        other.memory = {i: m.copy() for i, m in self.memory.items()}

    # --- resume and clean-up -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "local": [tuple(t.clone() if t is not None else None for t in x.live())
                                                  for x in self.local],
                "local_slots": [getattr(x, "start", 0) for x in self.local], "local_ids": self.local_ids.clone(),
                "memory": {i: (m.keys().clone(), m.values().clone()) if len(m) else None
                           for i, m in self.memory.items()}}

    def load_state_dict(self, state: dict, history: torch.Tensor):
        super().load_state_dict(state, history)
        slots = state.get("local_slots") or [0] * len(self.local)
        for local, (k, v), start in zip(self.local, state["local"], slots):
            local.set(k, v, self.rope, start)
        n_local = len(self.local[0])   # checkpoints from before local_ids: the window's tokens end the history
        self.local_ids = state.get("local_ids", history[len(history) - n_local:] if n_local else history[:0])
        for i, kv in state["memory"].items():
            self.memory[i] = self._new_memory()
            if kv is not None:
                self.memory[i].append(*kv)

    def close(self):
        super().close()
        self.local = self._new_local()
        self.local_ids = torch.zeros(0, dtype=torch.long)
        self.memory = {}
