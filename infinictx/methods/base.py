"""The base of every method's config: its settings validate when it is built (no model needed), and
`make_session` makes the method's session and attaches Temp-Lora on top when `temp_lora` asks for it."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InfinictxError
from ..core.models import LoadedModel
from ..core.registry import build, setting
from ..core.session import Session
from ..learners.temp_lora import TempLora, TempLoraConfig


@dataclass
class MethodConfig:
    temp_lora: TempLoraConfig | dict | bool | None = setting(
        None, "Temp-Lora on top of the method: True (its defaults), a dict of its settings, or a TempLoraConfig; "
        "its window W defaults to the method's (else 1024), its Δ to min(the method's Δ or 256, W/2)",
        cli=False, kw_only=True)

    method = ""   # the registered name (set by register_method)

    def __post_init__(self):
        self.validate()
        self.temp_lora = self._learner_config()

    def validate(self):
        """Check every setting that can be checked without a model (a run rejects bad settings before any
        work); settings that depend on the model are checked when the session is made."""

    def new_session(self, lm: LoadedModel) -> Session:
        """The method's own session, without a learner."""
        raise NotImplementedError

    def learner_defaults(self) -> dict:
        """Temp-Lora's window and chunk on top of this method."""
        window = getattr(self, "window", None) or 1024
        chunk = getattr(self, "chunk", None)
        return {"window": window, "chunk": min(256 if chunk is None else chunk, window // 2)}

    def _learner_config(self) -> TempLoraConfig | None:
        tl = self.temp_lora
        if tl is None or tl is False:
            return None
        if isinstance(tl, TempLoraConfig):
            return tl
        if tl is True:
            tl = {}
        if not isinstance(tl, dict):
            raise InfinictxError("temp_lora must be true, a dict of Temp-Lora settings or a TempLoraConfig")
        return build(TempLoraConfig, {**self.learner_defaults(), **tl}, "Temp-Lora")

    def make_session(self, lm: LoadedModel) -> Session:
        session = self.new_session(lm)
        if self.temp_lora is not None:
            try:
                session.attach(TempLora(lm, self.temp_lora))
            except BaseException:
                session.close()
                raise
            # the window with Temp-Lora is the temp-lora method; any other method gets it "on top"
            session.method = "temp-lora" if self.method == "window" else f"{self.method}+temp-lora"
        return session
