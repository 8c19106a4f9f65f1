"""Checkpoint I/O, kept importable here: it lives in :mod:`srp4ctr.models.checkpoint` (model
loading belongs to the models, so serving needs no training code)."""

from srp4ctr.models import checkpoint as _checkpoint
from srp4ctr.models.checkpoint import *

__all__ = list(_checkpoint.__all__)
