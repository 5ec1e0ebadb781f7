"""The plain sliding window: the model sees the last W tokens and nothing else. The baseline every method is
measured against; all of its behaviour lives in `infinictx.core.session.Session`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.models import LoadedModel
from ..core.registry import register_method, setting
from ..core.session import Session, check_window
from .base import MethodConfig


@register_method("window")
@dataclass
class WindowConfig(MethodConfig):
    window: int = setting(512, "W: tokens the model sees at once", short="-W")
    chunk: int | None = setting(None, "Δ: tokens scored (or generated) per step, read with the W−Δ tokens before "
                                "them (default min(256, W/2))", short="-D")

    def validate(self):
        if self.chunk is None:
            self.chunk = min(256, self.window // 2)
        check_window(self.window, self.chunk)

    def learner_defaults(self) -> dict:
        return {"window": self.window, "chunk": self.chunk}   # Temp-Lora reads exactly the window's chunks

    def new_session(self, lm: LoadedModel) -> Session:
        return Session(lm, self, self.window, self.chunk)
