"""Run configuration files: the settings of ``srp4ctr pretrain``, ``finetune`` and ``experiment``
as one YAML file (``--config FILE.yaml``).

Sections (every one optional; each key is a field of the dataclass named, so every setting can
be given, and an unknown key is an :class:`~srp4ctr.errors.InputError` naming the file, the
section and the key):

- ``dataset``: ``name``, ``path``, ``columns``, ``data_dir`` (the arguments of
  :func:`srp4ctr.data.prepare`; a relative ``path`` or ``data_dir`` is read from the file's
  folder).
- ``model``: :class:`~srp4ctr.models.ModelConfig` of every model.
- ``pretrain_model``: fields of ``ModelConfig`` that differ while pre-training (dropout, mask
  rate; never the architecture).
- ``finetune``: :class:`~srp4ctr.train.TrainConfig` of CTR training (``srp4ctr finetune`` and
  every CTR run of an experiment).
- ``pretrain``: ``TrainConfig`` of pre-training (``srp4ctr pretrain`` and an experiment's).
- ``experiment``: ``seeds`` (a count or a list), ``models`` (keys of
  :data:`srp4ctr.train.experiment.VARIANTS`), ``jobs``, ``strict_time`` (true: CTR histories
  hold only interactions strictly earlier than the candidate; default false),
  ``pretrain_overrides`` (per pre-training kind, ``TrainConfig`` fields that differ from the
  ``pretrain`` section for it, e.g. ``{bert: {lr: 0.001}}``).

Command-line flags override the file, the file overrides the defaults. Every run writes the
settings it resolved as ``run.yaml`` (a checkpoint folder) or ``config.yaml`` (an experiment),
in this same format, so ``--config`` of that file repeats the run. The settings of the committed
results are ``configs/ml-100k.yaml`` in the repository.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from srp4ctr.errors import InputError

__all__ = ["DATASET_KEYS", "EXPERIMENT_KEYS", "SECTIONS", "dump_run_config", "load_run_config",
           "write_run_config"]

DATASET_KEYS = ("name", "path", "columns", "data_dir")
EXPERIMENT_KEYS = ("seeds", "models", "jobs", "strict_time", "pretrain_overrides")
#: fields of ModelConfig that pre-training may set apart from fine-tuning
PRETRAIN_MODEL_KEYS = ("dropout", "mask_rate", "softmax", "sampled_softmax_above", "sampler",
                      "n_sampled", "loss_weights")


def _model_keys() -> tuple[str, ...]:
    from srp4ctr.models.spec import ModelConfig

    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def _train_keys() -> tuple[str, ...]:
    from srp4ctr.train.config import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def _section_keys() -> dict[str, tuple[str, ...]]:
    return {"dataset": DATASET_KEYS, "model": _model_keys(),
            "pretrain_model": PRETRAIN_MODEL_KEYS, "finetune": _train_keys(),
            "pretrain": _train_keys(), "experiment": EXPERIMENT_KEYS}


SECTIONS = ("dataset", "model", "pretrain_model", "finetune", "pretrain", "experiment")


def load_run_config(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The sections of the YAML file ``path`` (missing ones empty), checked: every section and
    key known, the model and training sections valid dataclasses. Raises
    :class:`~srp4ctr.errors.InputError` naming the file and what is wrong."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a config file is a mapping of sections "
                         f"({', '.join(SECTIONS)}), got {type(doc).__name__}")
    keys = _section_keys()
    unknown = [str(k) for k in doc if k not in keys]
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        body = doc.get(section) or {}
        if not isinstance(body, dict):
            raise InputError(f"{path}: section {section!r} must be a mapping, got "
                             f"{type(body).__name__}")
        bad = [f"{section}.{k}" for k in body if k not in keys[section]]
        if bad:
            raise InputError(f"{path}: unknown key(s) {bad}; {section!r} takes "
                             f"{list(keys[section])}")
        out[section] = dict(body)
    _coerce_floats(out)
    for key in ("path", "data_dir"):
        v = out["dataset"].get(key)
        if v is not None:
            if not isinstance(v, str):
                raise InputError(f"{path}: dataset.{key} must be a string, got {v!r}")
            p = Path(v).expanduser()
            out["dataset"][key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    _check(path, out)
    return out


def _coerce_floats(cfg: dict[str, dict[str, Any]]) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: a float field's numeric string is read as
    the number it spells."""
    from srp4ctr.models.spec import ModelConfig
    from srp4ctr.train.config import TrainConfig

    for section, cls in (("model", ModelConfig), ("pretrain_model", ModelConfig),
                         ("finetune", TrainConfig), ("pretrain", TrainConfig)):
        floats = {f.name for f in dataclasses.fields(cls) if isinstance(f.default, float)}
        for k, v in cfg[section].items():
            if k in floats and isinstance(v, str) and _is_number(v):
                cfg[section][k] = float(v)  # anything else: the dataclass names the bad value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check(path: Path, cfg: dict[str, dict[str, Any]]) -> None:
    """Build each dataclass once so a bad value is reported with the file's name."""
    from srp4ctr.models.spec import ModelConfig
    from srp4ctr.train.config import TrainConfig

    def attempt(section: str, build) -> None:
        try:
            build()
        except (InputError, TypeError, ValueError) as e:
            raise InputError(f"{path}: section {section!r}: {e}") from None

    attempt("model", lambda: ModelConfig.from_dict(cfg["model"]))
    attempt("pretrain_model",
            lambda: ModelConfig.from_dict({**cfg["model"], **cfg["pretrain_model"]}))
    attempt("finetune", lambda: TrainConfig.from_dict(cfg["finetune"]))
    attempt("pretrain", lambda: TrainConfig.from_dict(cfg["pretrain"]))
    exp = cfg["experiment"]
    seeds = exp.get("seeds")
    if seeds is not None and not (
            (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1)
            or (isinstance(seeds, list) and seeds
                and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds))):
        raise InputError(f"{path}: experiment.seeds must be a positive count or a list of "
                         f"integers, got {seeds!r}")
    jobs = exp.get("jobs")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise InputError(f"{path}: experiment.jobs must be a positive integer, got {jobs!r}")
    strict = exp.get("strict_time")
    if strict is not None and not isinstance(strict, bool):
        raise InputError(f"{path}: experiment.strict_time must be true or false, got {strict!r}")
    overrides = exp.get("pretrain_overrides")
    if overrides is not None:
        from srp4ctr.train.experiment import check_pretrain_overrides

        attempt("experiment", lambda: check_pretrain_overrides(
            overrides, TrainConfig.from_dict(cfg["pretrain"])))
    models = exp.get("models")
    if models is not None:
        from srp4ctr.train.experiment import VARIANTS

        if not isinstance(models, list) or not models:
            raise InputError(f"{path}: experiment.models must be a list of model keys")
        unknown = [m for m in models if m not in VARIANTS]
        if unknown:
            raise InputError(f"{path}: unknown experiment.models {unknown}; known: "
                             f"{list(VARIANTS)}")


def dump_run_config(cfg: dict[str, dict[str, Any]], header: str | None = None) -> str:
    """YAML text of a run configuration (its non-empty sections, in the canonical order)."""
    import yaml

    doc = {s: cfg[s] for s in SECTIONS if cfg.get(s)}
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text


def write_run_config(path: str | os.PathLike, cfg: dict[str, dict[str, Any]],
                     header: str | None = None) -> Path:
    """Write :func:`dump_run_config` to ``path``; returns it."""
    path = Path(path)
    path.write_text(dump_run_config(cfg, header), encoding="utf-8")
    return path
