"""The model registry and the models' checkpoint I/O: kinds, roles, building, loading by kind,
and that models (hence serving) import no training code."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from srp4ctr.errors import InputError
from srp4ctr.models import (
    MODEL_KINDS,
    FGBERT,
    ModelConfig,
    build_model,
    load_model,
    model_class,
    model_entry,
    model_kinds,
    register,
    save_checkpoint,
)
from srp4ctr.models.synthetic import synthetic_spec

SPEC = synthetic_spec()
SMALL = ModelConfig(d_model=16, n_heads=2, n_layers=1, max_len=12, head_hidden=(16, 8),
                    n_queries=2)


def test_kinds_roles_and_classes():
    assert MODEL_KINDS == model_kinds()
    assert set(model_kinds()) == set(model_kinds("ctr")) | set(model_kinds("pretrain"))
    assert not set(model_kinds("ctr")) & set(model_kinds("pretrain"))
    for kind in model_kinds():
        e = model_entry(kind)
        assert e.kind == kind and model_class(kind) is e.cls
        # a class's own kind is its ``kind`` attribute; variants fix config settings instead
        assert e.cls.kind == kind or e.overrides
    with pytest.raises(InputError, match="unknown model role"):
        model_kinds("serving")


def test_unknown_kind_names_the_choices():
    with pytest.raises(InputError, match="unknown model kind 'dien'; expected one of ") as e:
        model_entry("dien")
    assert all(k in str(e.value) for k in model_kinds())
    with pytest.raises(InputError, match="already registered"):
        register(FGBERT, role="pretrain")
    with pytest.raises(InputError, match="role"):
        register(FGBERT, role="serving", kind="another")


def test_variant_applies_its_overrides():
    (variant,) = [k for k in model_kinds("pretrain") if model_entry(k).overrides]
    m = build_model(variant, SPEC, SMALL)
    assert isinstance(m, model_class(variant))
    for name, value in model_entry(variant).overrides.items():
        assert getattr(m.config, name) == value


@pytest.mark.parametrize("kind", model_kinds())
def test_load_model_rebuilds_every_kind(tmp_path, kind):
    torch.manual_seed(0)
    model = build_model(kind, SPEC, SMALL)
    cfg = model.config
    save_checkpoint(tmp_path / kind, model, {"kind": kind, "model_config": cfg.to_dict(),
                                             "spec": SPEC.to_dict(), "dataset": {}})
    again, config = load_model(tmp_path / kind)
    assert type(again) is type(model) and config["kind"] == kind
    assert again.config == cfg
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_models_import_no_training_code():
    out = _fresh("import sys, srp4ctr.models\n"
                 "print([m for m in sys.modules if m.startswith('srp4ctr.train')])")
    assert out == "[]"


def test_command_line_parser_loads_no_torch():
    out = _fresh("import sys\nfrom srp4ctr.cli import build_parser\n"
                 "p = build_parser()\np.parse_args(['data', 'prepare'])\n"
                 "print('torch' in sys.modules)")
    assert out == "False"
