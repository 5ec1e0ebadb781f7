"""Long generation, chunk by chunk: each Δ-token chunk is conditioned on the last L_x tokens (L_x + Δ ≤ W), then
absorbed by the session (Temp-Lora trains its adapter on it) before the next chunk is generated."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import InfinictxError
from ..core.files import atomic_write, write_json
from ..core.progress import progress_bar
from ..core.registry import setting
from ..core.session import Sampler, Session
from .base import Outputs, Result, Task


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
    with progress_bar(progress, max_new_tokens, "tok", f"{session.method} generate") as bar:
        while produced < max_new_tokens:
            n = min(chunk, max_new_tokens - produced)
            piece = session.generate_chunk(n, context_len, sampler, cache_reuse=cache_reuse)
            session.absorb(piece)
            out.append(piece)
            produced += n
            bar.update(n)
    wall = time.perf_counter() - t0
    tokens = torch.cat(out)
    text = tokenizer.decode(tokens.tolist()) if tokenizer is not None else ""
    return GenerationResult(method=session.method, config=session.describe(), prompt_tokens=len(prompt_ids),
                            tokens=tokens, text=text, wall_s=wall,
                            generation_s=session.meter.wall_s.get("generation", 0.0), cache_reuse=cache_reuse,
                            prompt_absorbed=absorb_prompt, cost=session.meter.summary())


@dataclass
class GenerationTask(Task):
    """generate a long text chunk by chunk"""

    prompt: str | None = setting(None, "prompt text")
    prompt_file: str | None = setting(None, "file with the prompt")
    tokens: int = setting(1024, "tokens to generate")
    context: int | None = setting(None, "L_x: tokens each chunk is conditioned on (W−Δ)")
    cache_reuse: bool = setting(True, "re-encode the context after every update", flag="--no-cache-reuse")
    temperature: float = setting(0.0, "0 = greedy")
    top_p: float = setting(1.0, "nucleus sampling: smallest set of tokens with this much probability")
    repetition_penalty: float = setting(1.12, "penalty on tokens of the window and of the chunk so far")
    seed: int = setting(0, "sampling seed")

    name = "generate"
    default_method = "temp-lora"

    def check(self, config):
        if (self.prompt is None) == (self.prompt_file is None):
            raise InfinictxError("give the prompt with exactly one of --prompt or --prompt-file")
        if self.tokens < 1:
            raise InfinictxError("--tokens must be >= 1")

    def prepare(self) -> str:
        from ..data.texts import decode_text

        if self.prompt_file:
            p = Path(self.prompt_file)
            if not p.is_file():
                raise InfinictxError(f"prompt file {p} does not exist")
            prompt = decode_text(p.read_bytes(), str(p))
        else:
            prompt = self.prompt
        if not prompt or not prompt.strip():
            raise InfinictxError("the prompt is empty")
        return prompt

    def run(self, lm, config, inputs, outputs: Outputs, progress: bool) -> Result:
        from .report import cost_markdown

        ids = lm.tokenizer(inputs, return_tensors="pt", add_special_tokens=False).input_ids[0]
        sampler = Sampler(temperature=self.temperature, top_p=self.top_p,
                          repetition_penalty=self.repetition_penalty, seed=self.seed)
        torch.manual_seed(self.seed)
        with config.make_session(lm) as session:
            result = generate_long(session, ids, self.tokens, context_len=self.context, sampler=sampler,
                                   cache_reuse=self.cache_reuse, progress=progress, tokenizer=lm.tokenizer)
        summary = result.summary()
        summary.update({"model": lm.name, "text": result.text})
        note = (f"\n{result.method}: {len(result.tokens)} tokens in {result.wall_s:.1f} s "
                f"({summary['tokens_per_s']:.2f} tokens/s, cache reuse {'on' if result.cache_reuse else 'off'})\n"
                + cost_markdown(summary))
        summary["wall_s"] = result.wall_s
        return Result(summary=summary, stdout="" if outputs.text else result.text, stderr=note, data=result)

    def write(self, result: Result, outputs: Outputs):
        if outputs.text:
            atomic_write(outputs.text, result.data.text)
        if outputs.json:
            write_json(result.summary, outputs.json)
