"""Which models a server answers for: runs, model folders and names, loaded once, adapters sharing their base.

Adapter runs trained on the same base share one PeftModel: each run is a named adapter on it, and the base
itself is served too (adapters disabled), so a playground can compare base and tailored answers for free.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor.config import SPEEDUPS, check_speedup
from lmtailor.errors import ConfigError
from lmtailor.fastdecode import FAST, speed_up

__all__ = ["SPEEDUPS", "Slot", "load_models", "speed_up"]

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One model id the API answers for."""

    name: str
    model: Any  # nn.Module, usually a PeftModel or a transformers model (typed Any: methods are dynamic)
    tok: Any
    system_prompt: str | None = None
    adapter: str | None = None  # PEFT adapter name; None on a PeftModel means "adapters off" (the base)
    parent: str | None = None  # the base model's id when this is an adapter
    lock: threading.Lock = field(default_factory=threading.Lock)  # shared by slots on the same module
    max_positions: int = 2048
    retrieval: Any = None  # retrieved examples or passages (lmtailor.generate.retrieval_for), or None

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Hold the model with this slot's adapter switched on (or all adapters off for the base)."""
        with self.lock:
            if not hasattr(self.model, "peft_config"):
                yield self.model
            elif self.adapter is None:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(self.adapter)
                yield self.model


def _unique(name: str, taken: dict[str, Slot]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out


def load_models(targets: list[str], speedup: str = "none", kb: str | None = None) -> dict[str, Slot]:
    """Load every target (run folder, model folder or model name) into named slots.

    Adapter runs on the same base share one model; the base gets its own slot named after it. With a fast
    speed-up (fp16) each adapter run is merged into its own copy of the base instead, and the base is
    served only when named. `kb` gives every run a knowledge base to retrieve passages from (lmtailor.knowledge),
    with the run's own `retrieval:` settings where it has them.
    """
    from lmtailor.generate import retrieval_for
    from lmtailor.runs import Run

    check_speedup(speedup)
    if not targets:
        raise ConfigError("no model to serve", "give at least one run folder, model folder or model name")
    runs = [Run.open(target) for target in targets]  # every target is checked before any model loads
    slots: dict[str, Slot] = {}
    shared: dict[str, Slot] = {}  # resolved base -> the base slot of a shared PeftModel
    plain: list[Run] = []
    for run in runs:
        if not run.adapter or speedup in FAST:
            plain.append(run)
            continue
        key = _key(run.base_model)
        name = _unique(run.name, slots)
        if key not in shared:
            model, tok = run.load()
            model = speed_up(model, speedup)
            # The first adapter PEFT loads is called "default"; later runs are loaded under their own names.
            base = Slot(_unique(Path(run.base_model).name, slots), model, tok, max_positions=_max_positions(model))
            shared[key] = base
            slots[name] = Slot(name, model, tok, run.system_prompt, adapter="default", parent=base.name,
                               lock=base.lock, max_positions=base.max_positions,
                               retrieval=retrieval_for(run.config, kb))
        else:
            base = shared[key]
            run.add_adapter_to(base.model, name)  # a sealed run's adapter is decrypted into RAM for it
            if speedup == "bf16":
                base.model.to(torch.bfloat16)
            slots[name] = Slot(name, base.model, base.tok, run.system_prompt, adapter=name, parent=base.name,
                               lock=base.lock, max_positions=base.max_positions,
                               retrieval=retrieval_for(run.config, kb))
    for base in shared.values():
        slots.setdefault(base.name, base)
    for run in plain:
        try:
            plain_key: str | None = _key(run.target)
        except Exception:  # a target that does not resolve is loaded (and its error reported) below
            plain_key = None
        if plain_key in shared:
            continue  # already served as the base of an adapter run
        model, tok = run.load()
        model = speed_up(model, speedup)
        name = _unique(run.name, slots)
        slots[name] = Slot(name, model, tok, run.system_prompt, max_positions=_max_positions(model),
                           retrieval=retrieval_for(run.config, kb))
    for slot in slots.values():
        slot.model.eval()
    log.info("serving: %s", ", ".join(slots))
    return slots


def _key(name: str) -> str:
    from lmtailor.models import resolve_model

    folder = resolve_model(name)
    return str(Path(folder).resolve()) if Path(folder).is_dir() else folder


def _max_positions(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 2048)
