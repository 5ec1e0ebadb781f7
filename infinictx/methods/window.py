"""The plain sliding window: the model sees the last W tokens and nothing else. The baseline every method is
measured against; all of its behaviour lives in `infinictx.session.Session`."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import LoadedModel
from ..session import Session


@dataclass
class WindowConfig:
    window: int = 512   # W: tokens the model sees at once
    chunk: int = 256    # Δ: tokens scored (or generated) per step, read with the W−Δ tokens before them

    def make_session(self, lm: LoadedModel) -> Session:
        return Session(lm, self.window, self.chunk)
