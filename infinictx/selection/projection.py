"""A seeded Rademacher random projection of long gradient vectors to D dimensions (the Johnson–Lindenstrauss map
TRAK and LESS use): y = x R / √D with R's entries ±1. R is never held whole (P × D would not fit: P is the number
of LoRA parameters): it is generated block of rows by block of rows from a seed, the same blocks every time, so
vectors projected in different calls, processes or batches live in the same space. Generating R costs P × D per
call whatever the number of rows, so project many vectors per call."""

from __future__ import annotations

import torch

from ..core.errors import InfinictxError

_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1   # (256, 8): a byte's bits as ±1


class RademacherProjector:
    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, block: int = 4096):
        if grad_dim < 1 or proj_dim < 1 or block < 1:
            raise InfinictxError(f"projection sizes must be >= 1 (got {grad_dim} -> {proj_dim}, block {block})")
        self.grad_dim, self.proj_dim, self.seed, self.block = grad_dim, proj_dim, seed, block

    def _rows(self, start: int) -> torch.Tensor:
        """Rows start … start+block of R: random bytes, each giving 8 signs (8× fewer draws than one per sign)."""
        rows = min(self.block, self.grad_dim - start)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        packed = torch.randint(0, 256, (rows, -(-self.proj_dim // 8)), generator=gen, dtype=torch.uint8)
        return _SIGNS[packed.long()].reshape(rows, -1)[:, :self.proj_dim]   # one gather: byte -> its 8 signs

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(n, grad_dim) -> (n, proj_dim), in float32 (x may be stored in a narrower float type)."""
        if x.dim() != 2 or x.shape[1] != self.grad_dim:
            raise InfinictxError(f"expected (n, {self.grad_dim}) vectors, got {tuple(x.shape)}")
        out = torch.zeros(x.shape[0], self.proj_dim)
        for start in range(0, self.grad_dim, self.block):
            out += x[:, start:start + self.block].float() @ self._rows(start)
        return out / self.proj_dim ** 0.5
