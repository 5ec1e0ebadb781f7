"""Long generation, chunk by chunk: each Δ-token chunk is conditioned on the last L_x tokens (L_x + Δ ≤ W), then
absorbed by the session (Temp-Lora trains its adapter on it) before the next chunk is generated."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import InfinictxError
from .session import Sampler, Session


@dataclass
class GenerationResult:
    method: str
    config: dict
    prompt_tokens: int
    tokens: torch.Tensor
    text: str
    wall_s: float
    generation_s: float
    cache_reuse: bool
    prompt_absorbed: bool
    cost: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.tokens)
        return {"method": self.method, "config": self.config, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": n, "cache_reuse": self.cache_reuse, "prompt_absorbed": self.prompt_absorbed,
                "wall_s": round(self.wall_s, 3),
                "tokens_per_s": n / self.wall_s if self.wall_s else None,
                "decode_tokens_per_s": n / self.generation_s if self.generation_s else None,
                **self.cost}


def generate_long(session: Session, prompt_ids: torch.Tensor, max_new_tokens: int, context_len: int | None = None,
                  sampler: Sampler | None = None, cache_reuse: bool = True, progress: bool = True,
                  tokenizer=None) -> GenerationResult:
    """Generate `max_new_tokens` after `prompt_ids`. `context_len` is L_x (default W − Δ).

    A prompt longer than L_x is first absorbed chunk by chunk (Temp-Lora learns it, as the unofficial HF
    pipeline does), so what falls out of the window is not lost; a shorter prompt is only context."""
    sampler = sampler or Sampler()
    chunk, window = session.chunk, session.window
    context_len = window - chunk if context_len is None else context_len
    if context_len < 1 or context_len + chunk > window:
        raise InfinictxError(f"generation context L_x={context_len} + chunk Δ={chunk} must be within the "
                             f"window W={window} (and L_x >= 1)")
    if max_new_tokens < 1:
        raise InfinictxError("--tokens must be >= 1")
    prompt_ids = prompt_ids.to(torch.long).cpu()
    if len(prompt_ids) == 0:
        raise InfinictxError("the prompt is empty")
    t0 = time.perf_counter()
    absorb_prompt = len(prompt_ids) > context_len
    if absorb_prompt:
        for s in range(0, len(prompt_ids), chunk):
            session.absorb(prompt_ids[s:s + chunk])
    else:
        session.add_context(prompt_ids)
    out, produced = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_new_tokens, unit="tok", desc=f"{session.method} generate", dynamic_ncols=True)
    try:
        while produced < max_new_tokens:
            n = min(chunk, max_new_tokens - produced)
            piece = session.generate_chunk(n, context_len, sampler, cache_reuse=cache_reuse)
            session.absorb(piece)
            out.append(piece)
            produced += n
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    tokens = torch.cat(out)
    text = tokenizer.decode(tokens.tolist()) if tokenizer is not None else ""
    return GenerationResult(method=session.method, config=session.describe(), prompt_tokens=len(prompt_ids),
                            tokens=tokens, text=text, wall_s=wall,
                            generation_s=session.meter.wall_s.get("generation", 0.0), cache_reuse=cache_reuse,
                            prompt_absorbed=absorb_prompt, cost=session.meter.summary())
