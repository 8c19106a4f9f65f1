"""The model registry: every model kind, the class that builds it and what it is for.

A kind is the string a checkpoint's ``config.json`` records and the command line takes; it is
spelled once, as the model class's ``kind`` attribute (or, for a variant of a class, in its
:func:`register` call). Training, checkpoint loading, the command line and the FLOP counts all
look kinds up here, so a new model is one module and one :func:`register` call (in
``srp4ctr/models/__init__.py``, which keeps the registration order: the order of every list of
kinds shown to users)::

    register(MyModel, role="ctr")                      # MyModel.kind = "my_model"
    build_model("my_model", spec, config)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from srp4ctr.errors import InputError

__all__ = ["ROLES", "ModelEntry", "build_model", "model_class", "model_entry", "model_kinds",
           "register"]

ROLES = ("ctr", "pretrain")

# (config, history length L, user fields u) -> (user-side, per-candidate) multiply-adds
MacsFormula = Callable[[Any, int, int], tuple[int, int]]


@dataclass(frozen=True)
class ModelEntry:
    """One registered kind.

    ``role``: ``"ctr"`` (``forward(batch) -> logits``, fine-tuned with BCE) or ``"pretrain"`` (a
    sequence encoder pre-trained on next-item objectives). ``takes_encoder``: the constructor
    takes a (pre-trained) FG-BERT as its third argument. ``overrides``: model-config settings the
    kind fixes (a variant of a class, e.g. an encoder on item ids only). ``macs``: the analytic
    cost formula :func:`~srp4ctr.models.flops.flops_per_request` uses, if the kind has one.
    """

    kind: str
    cls: type
    role: str
    takes_encoder: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    macs: MacsFormula | None = None

    def configure(self, config):
        """``config`` with this kind's ``overrides`` applied (``config`` itself if none)."""
        if not self.overrides:
            return config
        return type(config).from_dict({**config.to_dict(), **self.overrides})

    def build(self, spec, config, encoder=None):
        if encoder is not None and not self.takes_encoder:
            raise InputError(f"model kind {self.kind!r} takes no pre-trained encoder")
        config = self.configure(config)
        if self.takes_encoder:
            return self.cls(spec, config, encoder)
        return self.cls(spec, config)


_ENTRIES: dict[str, ModelEntry] = {}


def register(cls: type, *, role: str, kind: str | None = None, takes_encoder: bool = False,
             overrides: Mapping[str, Any] | None = None, macs: MacsFormula | None = None
             ) -> ModelEntry:
    """Register ``cls`` under ``kind`` (default: ``cls.kind``); see :class:`ModelEntry`."""
    kind = kind if kind is not None else getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise InputError(f"{cls.__name__}: a model kind is a non-empty string (set {cls.__name__}"
                         ".kind or pass kind=)")
    if role not in ROLES:
        raise InputError(f"model kind {kind!r}: role {role!r}, expected one of {', '.join(ROLES)}")
    if kind in _ENTRIES:
        raise InputError(f"model kind {kind!r} is already registered "
                         f"({_ENTRIES[kind].cls.__name__})")
    entry = ModelEntry(kind, cls, role, takes_encoder, MappingProxyType(dict(overrides or {})),
                       macs)
    _ENTRIES[kind] = entry
    return entry


def model_kinds(role: str | None = None) -> tuple[str, ...]:
    """The registered kinds (of ``role`` if given), in registration order."""
    if role is not None and role not in ROLES:
        raise InputError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
    return tuple(k for k, e in _ENTRIES.items() if role is None or e.role == role)


def model_entry(kind: str) -> ModelEntry:
    """The entry of ``kind``; :class:`~srp4ctr.errors.InputError` naming the choices if unknown."""
    try:
        return _ENTRIES[kind]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown model kind {kind!r}; expected one of {', '.join(model_kinds())}"
        ) from None


def model_class(kind: str) -> type:
    """The class that builds models of ``kind``."""
    return model_entry(kind).cls


def build_model(kind: str, spec, config, encoder=None):
    """A model of ``kind`` from a :class:`~srp4ctr.models.ModelSpec` and a
    :class:`~srp4ctr.models.ModelConfig` (with the kind's ``overrides`` applied). ``encoder`` (a
    pre-trained FG-BERT) is used by the kinds that take one and must match ``config``'s
    architecture; the others refuse it."""
    return model_entry(kind).build(spec, config, encoder)
