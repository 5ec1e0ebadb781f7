"""A seeded Rademacher random projection of long gradient vectors to D dimensions (the Johnson–Lindenstrauss map
TRAK and LESS use): y = x R / √D with R's entries ±1. R is never held whole (P × D would not fit: P is the number of
LoRA parameters): it is generated block of rows by block of rows from a seed, the same blocks every time, so
vectors projected in different calls, processes or batches live in the same space."""

from __future__ import annotations

import torch

from ..core.errors import InfinictxError


class RademacherProjector:
    def __init__(self, grad_dim: int, proj_dim: int, seed: int = 0, block: int = 4096):
        if grad_dim < 1 or proj_dim < 1 or block < 1:
            raise InfinictxError(f"projection sizes must be >= 1 (got {grad_dim} -> {proj_dim}, block {block})")
        self.grad_dim, self.proj_dim, self.seed, self.block = grad_dim, proj_dim, seed, block

    def _rows(self, start: int) -> torch.Tensor:
        rows = min(self.block, self.grad_dim - start)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        signs = torch.randint(0, 2, (rows, self.proj_dim), generator=gen, dtype=torch.int8)
        return signs.float().mul_(2).sub_(1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(n, grad_dim) -> (n, proj_dim), in float32."""
        if x.dim() != 2 or x.shape[1] != self.grad_dim:
            raise InfinictxError(f"expected (n, {self.grad_dim}) vectors, got {tuple(x.shape)}")
        x = x.float()
        out = torch.zeros(x.shape[0], self.proj_dim)
        for start in range(0, self.grad_dim, self.block):
            out += x[:, start:start + self.block] @ self._rows(start)
        return out / self.proj_dim ** 0.5
