"""ONNX export of a fine-tuned SRP4CTR model: folded inference served by ONNX Runtime and numpy.

::

    from srp4ctr.engine.onnx_export import export_onnx

    manifest = export_onnx("runs/srp4ctr", "runs/srp4ctr-onnx", data_dir="data")
    # or: srp4ctr export-onnx runs/srp4ctr --out runs/srp4ctr-onnx --data-dir data

The folder holds three graphs, the same split as :class:`~srp4ctr.engine.Engine`:

``user_encoder.onnx`` (once per request): one user's encoded history -> the
:class:`~srp4ctr.engine.UserCache` tensors, same names and layout (``NL`` tower layers, ``H``
heads of width ``Dh``, ``d = H * Dh``, ``M`` Q-Former queries, ``h1`` units in the head's first
layer, ``n`` history positions fed, ``1 <= n <= max_len``)::

    hist_item  int64 [n]      internal item ids, oldest first (0 = padding)
    hist_len   int64 []       real positions: n for an unpadded history (positions >= hist_len
                              are right padding; 0 with one padding position = empty history)
    hist_<f>   int64 [n]      one per behaviour field the model embeds (rating, gap, hour, ...)
    user_<f>   int64 []       one per user field, only when the Q-Former is offset by user features
    ->
    k, v       float32 [NL, n, H, Dh]   each layer's keys / values (absent when NL = 0); rows
                                        >= hist_len (padding) are zero
    head_user  float32 [h1]             the head's first layer on the user part, bias included
    qtokens    float32 [M, d]           the Q-Former tokens (absent without a Q-Former)
    pooled     float32 [d]              mean final state (only the use_xattn=False ablation)

``scorer.onnx`` (per request, any number of candidates)::

    k, v       float32 [NL, n, H, Dh]   a cache's keys / values, n >= 1 (absent when NL = 0)
    head_user  float32 [h1]
    cand_item  int64 [C]                internal item ids, 1 .. n_items + 1 (the last: OOV)
    ->
    probs      float32 [C]              click probabilities
    logits     float32 [C]

``scorer_multi.onnx`` (several users in one call, jagged: no padding to the longest user)::

    k, v        float32 [NL, N, H, Dh]  the users' K/V rows concatenated (each user >= 1 row)
    kv_offsets  int64 [B+1]             user b's rows are kv_offsets[b]:kv_offsets[b+1]
    head_user   float32 [B, h1]
    cand_item   int64 [Ct]              the users' candidates concatenated
    cand_offsets int64 [B+1]            user b's candidates are cand_offsets[b]:cand_offsets[b+1]
    ->
    probs, logits float32 [Ct]

It is the same tower with each candidate's scores against other users' rows set to -inf before
the softmax (weight exactly 0), so it equals scoring each user alone; its cost grows with
Ct x N, so a caller batches a few users per call (:meth:`srp4ctr.serving.Scorer.score_many`
bounds Ct x N).

The scorer is the engine's torch backend (:mod:`srp4ctr.engine.folded`) as a graph: the per-item
tables ``z0`` / ``q0`` / ``hz0`` are initializers gathered per candidate, the user's K/V are read
in place (never repeated per candidate), and the attention scale is folded into ``q0`` and the
later layers' ``W_Q``. An empty history (n = 0, allowed by the engine) is fed to the scorer as
one all-zero K/V row: the softmax over a single key is exactly 1 and its value is 0, so the
attention output is exactly the zero the engine uses for an empty history.

``manifest.json`` describes every input and output (name, dtype, shape with the dynamic axes
``n`` and ``C`` and their ranges), the opset, the model and dataset fingerprints, the rules the
serving side must apply before calling ONNX Runtime (dtypes, equal ``k``/``v`` shapes, id
ranges, finite values). ``serving.json`` / ``serving.npz`` are the dataset's serving tables
(:func:`srp4ctr.data.dataset.save_serving_tables`: raw id maps, item and user feature tables,
behaviour-value rules), from which the data pipeline's own ``encode_user_history`` and
``encode_items`` build the graphs' inputs. :mod:`srp4ctr.serving` serves the folder with numpy
and ONNX Runtime or OpenVINO (no torch); ``srp4ctr export-triton`` lays it out as a Triton
Inference Server repository (:mod:`srp4ctr.engine.triton_export`).

Export path: ``torch.onnx.export(dynamo=True)`` of two small modules built from the model's own
layers (the encoder: FG-BERT's ``encode_embedded``, the Q-Former and the head's user block, with
the item-field embeddings gathered from the folded ``z0`` table, whose rows equal
``FieldEmbedding.item_embedding``) and from the engine's :class:`~srp4ctr.engine.FoldedModel`
(the scorer). Every graph passes ``onnx.checker.check_model(full_check=True)`` and, with
``verify=True`` (the default, when onnxruntime is installed), is run in ONNX Runtime against the
engine before the folder is written.

Attention in the scorer (``attention=``): ``"matmul"`` is plain ``MatMul -> Softmax -> MatMul``
per head; ``"attention"`` is the standard ONNX ``Attention`` op (opset 23, 3-D inputs
``[1, C, d]`` / ``[1, n, d]``, no mask), which ONNX Runtime 1.32 runs on CPU with its own kernel.
Measured with ``bench/bench_onnx_cpu.py`` on a 2-core build machine (shared, load average
~3; intra-op threads 2, no spinning; interleaved medians of 40 rounds; d = 64,
2 layers, 2 heads, 4 queries, head 384 -> 200 -> 80 -> 1, history 200; the engine's torch backend
on the same ids in the same run for scale)::

    candidates   Attention op   MatMul/Softmax   MatMul / Attention (3 runs)   torch backend
    100          0.73 ms        0.75 ms          1.04, 0.99, 1.03              1.39 ms
    1000         4.86 ms        4.90 ms          1.01, 1.01, 1.00              8.21 ms
    4096         20.6 ms        20.5 ms          0.99, 0.97, 1.00              28.4 ms

The two are the same within the noise (the op does the same two products and softmax; it
saves a few transposes, which shows only at small C). ``"auto"`` therefore keeps
``"matmul"``: it runs at any opset >= 18 on older runtimes too, so the default opset is 20
(ONNX Runtime >= 1.17); ask for ``attention="attention", opset=23`` to get the op. The
encoder's attentions are masked (padding); ONNX Runtime 1.32's CPU ``Attention`` kernel refuses a
key mask broadcast over the queries (``[B, 1, 1, n]``), so they are MatMul/Softmax at every opset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr.errors import InputError
from srp4ctr.kernels import TowerLayerParams
from srp4ctr.kernels.reference import candidate_tower_ref
from srp4ctr.models.layers import recency_positions, valid_mask
from srp4ctr.serving.scorer import MANIFEST_FORMAT, MANIFEST_VERSION, read_export_manifest

from .backends.torch import head
from .folded import FoldedModel

__all__ = [
    "ATTENTION_VARIANTS",
    "DEFAULT_OPSET",
    "ENCODER_FILE",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MULTI_SCORER_FILE",
    "SCORER_FILE",
    "ScorerGraph",
    "UserEncoderGraph",
    "cli_export_onnx",
    "export_engine",
    "export_onnx",
    "read_manifest",
]

DEFAULT_OPSET = 20  # ONNX Runtime >= 1.17; the Attention op needs 23
MIN_OPSET = 18  # the dynamo exporter's floor; LayerNormalization needs 17
ATTENTION_VARIANTS = ("auto", "attention", "matmul")
ENCODER_FILE = "user_encoder.onnx"
SCORER_FILE = "scorer.onnx"
MULTI_SCORER_FILE = "scorer_multi.onnx"
MANIFEST_FILE = "manifest.json"
#: above this many bytes of weights a graph keeps them in a side file ``<graph>.onnx.data``
#: (a protobuf file cannot exceed 2 GiB)
EXTERNAL_DATA_BYTES = 1 << 30
#: the behaviour fields :func:`srp4ctr.data.features.behaviour_features` can compute
_COMPUTABLE = ("gap", "hour", "weekday")


# --------------------------------------------------------------------------------------------
# the two graphs as torch modules


class UserEncoderGraph(nn.Module):
    """The user side of one SRP4CTR model for one user, in the layout of the exported encoder.

    ``forward(hist_item [n], hist_len [], *hist_fields [n], *user_fields [])`` -> ``(k, v,
    head_user, qtokens, pooled)`` with only the entries the model has (see the module
    docstring). The item-field embeddings come from ``z0`` (the folded per-item table, rows equal
    to ``FieldEmbedding.item_embedding``); everything else is the model's own modules, as in
    :meth:`SRP4CTR.encode_users <srp4ctr.models.SRP4CTR.encode_users>` with a batch of one.
    """

    def __init__(self, model, z0: torch.Tensor):
        super().__init__()
        cfg = model.config
        self.model = model
        self.register_buffer("z0", z0.detach().to(torch.float32).contiguous(), persistent=False)
        self.behaviour_fields = list(model.encoder.behaviour_group)
        self.user_fields = list(model.user_emb.fields) if model.user_emb is not None else []
        self.use_xattn = bool(cfg.use_xattn)
        self.n_layers = len(model.cand_layers)
        self.output_names = (["k", "v"] if self.n_layers else []) + ["head_user"]
        if model.qformer is not None:
            self.output_names.append("qtokens")
        if not cfg.use_xattn:
            self.output_names.append("pooled")

    @property
    def input_names(self) -> list[str]:
        return (["hist_item", "hist_len"] + [f"hist_{f}" for f in self.behaviour_fields]
                + [f"user_{f}" for f in self.user_fields])

    def forward(self, hist_item: torch.Tensor, hist_len: torch.Tensor, *fields: torch.Tensor):
        m = self.model
        enc = m.encoder
        nb = len(self.behaviour_fields)
        W = hist_item.shape[0]
        lens = hist_len.reshape(1)
        batch = {"hist_item": hist_item.unsqueeze(0), "hist_len": lens}
        for f, t in zip(self.behaviour_fields, fields[:nb]):
            batch[f"hist_{f}"] = t.unsqueeze(0)
        for f, t in zip(self.user_fields, fields[nb:]):
            batch[f"user_{f}"] = t.reshape(1)
        # FGBERT.embed, the item fields from the folded table
        x = F.embedding(batch["hist_item"], self.z0)
        beh = enc.embeddings.behaviour_embedding(batch)
        if beh is not None:
            x = x + beh
        x = x + enc.position(recency_positions(lens, W))
        valid = valid_mask(lens, W)
        # SRP4CTR.encode_users
        if self.use_xattn:
            hidden, kv = enc.encode_embedded(x, valid, return_kv=True)
        else:
            hidden, kv = enc.encode_embedded(x, valid), []
        pooled, qtokens, head_user = m.summarise_user(hidden, valid, batch)
        out: list[torch.Tensor] = []
        if self.n_layers:
            # padding rows are zeroed: an empty history (one padding position, hist_len 0)
            # then yields the one all-zero K/V row the scorer takes for it
            keep = valid[0].to(x.dtype)[None, :, None, None]
            out += [torch.stack([k[0] for k, _ in kv]) * keep,
                    torch.stack([v[0] for _, v in kv]) * keep]
        out.append(head_user[0])
        if qtokens is not None:
            out.append(qtokens[0])
        if pooled is not None:
            out.append(pooled[0])
        return tuple(out)


class ScorerGraph(nn.Module):
    """The candidate side of :class:`~srp4ctr.engine.FoldedModel` in the exported layout.

    ``forward([k [NL, n, H, Dh], v,] head_user [h1], cand_item [C]) -> (probs [C], logits
    [C])``. The folded tables are buffers (initializers of the graph); the attention scale
    ``1/sqrt(Dh)`` is folded into ``q0`` and the later layers' ``W_Q``/``b_Q``.

    ``attention``: ``"matmul"`` (MatMul/Softmax/MatMul per head) or ``"attention"`` (the ONNX
    ``Attention`` op through :func:`torch.onnx.ops.attention`, opset >= 23).
    """

    def __init__(self, fm: FoldedModel, attention: str = "matmul", *, multi: bool = False):
        super().__init__()
        self.multi = bool(multi)
        if multi and attention != "matmul":
            raise InputError("the multi-user scorer graph uses attention='matmul' (the ONNX "
                             "Attention op takes no per-user mask here)")
        if attention not in ("matmul", "attention"):
            raise InputError(f"attention must be 'matmul' or 'attention', got {attention!r}")
        if not fm.tables:
            raise InputError("the scorer graph needs the folded per-item tables")
        self.attention = attention
        self.d, self.H, self.Dh = fm.d_model, fm.n_heads, fm.head_dim
        self.n_layers = fm.n_layers
        self.eps = fm.eps
        scale = fm.head_dim ** -0.5

        def buf(name: str, t: torch.Tensor) -> None:
            self.register_buffer(name, t.detach().to(torch.float32).contiguous(), persistent=False)

        buf("z0", fm.z0)
        buf("hz0", fm.hz0)
        self.has_item_bias = fm.item_bias is not None
        if self.has_item_bias:
            buf("item_bias", fm.item_bias)
        if self.n_layers:
            buf("q0", fm.q0 * scale)
            buf("head_zn", fm.head_zn)
        for i, p in enumerate(fm.layers):
            for name, t in p._asdict().items():
                buf(f"l{i}_{name}", t * scale if name in ("wq", "bq") else t)
        self.n_rest = len(fm.rest)
        for i, (w, b) in enumerate(fm.rest):
            buf(f"rest{i}_w", w)
            buf(f"rest{i}_b", b)
        if multi:
            self.input_names = ((["k", "v", "kv_offsets"] if self.n_layers else [])
                                + ["head_user", "cand_item", "cand_offsets"])
        else:
            self.input_names = ((["k", "v"] if self.n_layers else [])
                                + ["head_user", "cand_item"])
        self.output_names = ["probs", "logits"]

    def _layers(self) -> list[TowerLayerParams]:
        return [TowerLayerParams(*(getattr(self, f"l{i}_{name}")
                                   for name in TowerLayerParams._fields))
                for i in range(self.n_layers)]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets, kv_offsets,
                scale: float) -> torch.Tensor:
        """One user's q [C, H, Dh] (scale folded in), k/v [n, H, Dh] -> [C, H, Dh]: the
        reference tower's attention primitive, in ops that export (MatMul/Softmax or the ONNX
        Attention op)."""
        C, n, H, Dh = q.shape[0], k.shape[0], self.H, self.Dh
        if self.attention == "attention":
            y = torch.onnx.ops.attention(
                q.reshape(1, C, H * Dh), k.reshape(1, n, H * Dh), v.reshape(1, n, H * Dh),
                q_num_heads=H, kv_num_heads=H, scale=scale,
            )[0]
            return y[0].view(C, H, Dh)
        qh = q.transpose(0, 1)                                              # [H, C, Dh]
        p = torch.softmax(torch.matmul(qh, k.permute(1, 2, 0)) * scale if scale != 1.0
                          else torch.matmul(qh, k.permute(1, 2, 0)), dim=-1)  # [H, C, n]
        return torch.matmul(p, v.transpose(0, 1)).transpose(0, 1)           # [C, H, Dh]

    @staticmethod
    def _owner(offsets: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
        """int64 [n]: the user (0 .. B-1) that each of n jagged rows belongs to, from the
        offsets [B+1] (a comparison with every boundary: ops that export)."""
        rows = torch.ones_like(like, dtype=torch.int64).cumsum(0) - 1      # arange(n)
        return (rows[:, None] >= offsets[None, 1:]).to(torch.int64).sum(1)

    def _attend_jagged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       q_user: torch.Tensor, kv_user: torch.Tensor, scale: float) -> torch.Tensor:
        """Several users' candidates q [C, H, Dh] over all their K/V rows k/v [N, H, Dh]; each
        candidate sees only its own user's rows (scores of other users' rows are -inf before
        the softmax, so they get weight exactly 0). Cost grows with C x N, not per user."""
        qh = q.transpose(0, 1)                                              # [H, C, Dh]
        s = torch.matmul(qh, k.permute(1, 2, 0))                            # [H, C, N]
        if scale != 1.0:
            s = s * scale
        other = (q_user[:, None] != kv_user[None, :])[None]                 # [1, C, N]
        p = torch.softmax(s.masked_fill(other, float("-inf")), dim=-1)
        return torch.matmul(p, v.transpose(0, 1)).transpose(0, 1)           # [C, H, Dh]

    def forward(self, *args: torch.Tensor):
        k = v = kv_off = cand_off = None
        if self.multi and self.n_layers:
            k, v, kv_off, head_user, cand_item, cand_off = args
        elif self.multi:
            head_user, cand_item, cand_off = args
        elif self.n_layers:
            k, v, head_user, cand_item = args
        else:
            head_user, cand_item = args
        z = self.z0.index_select(0, cand_item)
        if self.multi:
            q_user = self._owner(cand_off, cand_item.shape[0], cand_item)
            head_user = head_user.index_select(0, q_user)                   # [C, h1]
        zn = None
        if self.n_layers:
            if self.multi:
                attend, q_offsets = self._attend_jagged, q_user
                kv_offsets = self._owner(kv_off, k.shape[1], k[0, :, 0, 0])
            else:
                attend, q_offsets, kv_offsets = self._attend, None, None
            zn = candidate_tower_ref(
                z, [(k[i], v[i]) for i in range(self.n_layers)], self._layers(),
                q_offsets, kv_offsets, q0=self.q0.index_select(0, cand_item), scale=1.0,
                upcast=False, attention=attend, eps=self.eps)
        rest = [(getattr(self, f"rest{i}_w"), getattr(self, f"rest{i}_b"))
                for i in range(self.n_rest)]
        logits = head(zn, self.hz0.index_select(0, cand_item), head_user,
                      self.head_zn if self.n_layers else None, rest, inplace=False)
        if self.has_item_bias:
            logits = logits + self.item_bias.index_select(0, cand_item)
        return torch.sigmoid(logits), logits


# --------------------------------------------------------------------------------------------
# export


def _resolve_attention(attention: str, opset: int) -> str:
    if not isinstance(attention, str) or attention not in ATTENTION_VARIANTS:
        raise InputError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
    if attention == "auto":  # measured no faster than MatMul/Softmax (module docstring)
        return "matmul"
    if attention == "attention" and opset < 23:
        raise InputError(f"the ONNX Attention op needs opset >= 23, got opset {opset}")
    return attention


def _check_opset(opset: Any) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InputError(f"opset must be an int, got {opset!r}")
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise InputError(f"opset must lie in {MIN_OPSET}..{top} (this onnx), got {opset}")
    return opset


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, deprecation warnings and registry notes off."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _masked_sdpa_translation() -> dict:
    """aten SDPA -> MatMul/Softmax (onnxscript's torchlib lowering), used for the encoder."""
    try:
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention
    except ImportError:  # pragma: no cover - other onnxscript layouts: keep the default
        return {}
    return {torch.ops.aten.scaled_dot_product_attention.default:
            aten_scaled_dot_product_attention}


def _to_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
             dynamic_shapes: tuple, opset: int, translation: dict | None = None):
    """torch.onnx.export (dynamo) -> onnx.ModelProto."""
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            module, args, None, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, verbose=False,
            optimize=True, custom_translation_table=translation or None,
        )
    return prog.model_proto


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _initializer_bytes(proto) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    return sum(int(np.prod(t.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer)


def _save_graph(proto, path: Path, fingerprint: str, role: str, external: Any) -> list[Path]:
    """Check and write one graph; big weights go to ``<name>.data``. Returns the files."""
    import onnx

    # the lowest IR version the opsets allow (the exporter writes the newest), so that older
    # runtimes load the graph
    lowest = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    proto.ir_version = min(proto.ir_version, lowest)
    del proto.metadata_props[:]
    for key, value in (("srp4ctr.role", role), ("srp4ctr.model_fingerprint", fingerprint)):
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "srp4ctr"
    big = (_initializer_bytes(proto) > EXTERNAL_DATA_BYTES) if external == "auto" else bool(external)
    if big:
        data = path.name + ".data"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        onnx.checker.check_model(str(path), full_check=True)
        return [path, path.parent / data]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(path))
    return [path]


def _shape(dims: list) -> list:
    return [int(x) if isinstance(x, (int, np.integer)) else str(x) for x in dims]


def _io_spec(name: str, dtype: str, shape: list, what: str, **extra) -> dict:
    return {"name": name, "dtype": dtype, "shape": _shape(shape), "what": what, **extra}


def _cpu_model(engine):
    model = engine.model
    if engine.device.type != "cpu":
        model = copy.deepcopy(model).to("cpu")
    return model.float().eval()


def export_engine(engine, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                  attention: str = "auto", verify: bool = True,
                  external_data: bool | str = "auto", int8: bool = False) -> dict[str, Any]:
    """Export the model of ``engine`` (:meth:`Engine.load <srp4ctr.engine.Engine.load>` or
    :meth:`Engine.from_model <srp4ctr.engine.Engine.from_model>`) into ``out_dir``.

    Same arguments as :func:`export_onnx`; returns the manifest (also written to
    ``out_dir/manifest.json``).
    """
    from srp4ctr._files import atomic_write_dir, shareable

    opset = _check_opset(opset)
    variant = _resolve_attention(attention, opset)
    out = Path(out_dir)
    _check_out_dir(out)
    model = _cpu_model(engine)
    cfg = model.config
    ds = engine.dataset
    with torch.no_grad():
        fm = FoldedModel(model, torch.float32, torch.device("cpu"), fold_items=True)
    _check_features(ds, model)

    encoder = UserEncoderGraph(model, fm.z0).eval()
    scorer = ScorerGraph(fm, variant).eval()
    NL, L = fm.n_layers, int(cfg.max_len)

    # example inputs: a history of 3 positions, 5 candidates (the axes are dynamic)
    n0, c0 = min(3, L), 5
    enc_args: tuple = (torch.arange(1, n0 + 1, dtype=torch.int64) % ds.n_items + 1,
                       torch.tensor(n0, dtype=torch.int64))
    enc_args += tuple(torch.ones(n0, dtype=torch.int64) for _ in encoder.behaviour_fields)
    enc_args += tuple(torch.tensor(1, dtype=torch.int64) for _ in encoder.user_fields)
    n_dim = torch.export.Dim("n", min=1, max=L)
    enc_dyn = tuple({0: n_dim} if a.dim() == 1 else None for a in enc_args)
    enc_dyn = (enc_dyn[0], enc_dyn[1], enc_dyn[2:])  # forward(hist_item, hist_len, *fields)
    enc_proto = _to_onnx(encoder, enc_args, encoder.input_names, encoder.output_names, enc_dyn,
                         opset, _masked_sdpa_translation())

    with torch.no_grad():
        kv0 = encoder(*enc_args)
    cand0 = torch.arange(1, c0 + 1, dtype=torch.int64) % (ds.n_items + 1) + 1
    c_dim = torch.export.Dim("C", min=1)
    kv_dim = torch.export.Dim("n", min=1, max=L)
    if NL:
        sc_args = (kv0[0], kv0[1], kv0[2], cand0)
        sc_dyn: tuple = ({1: kv_dim}, {1: kv_dim}, None, {0: c_dim})
    else:
        sc_args = (kv0[0], cand0)
        sc_dyn = (None, {0: c_dim})
    sc_proto = _to_onnx(scorer, sc_args, scorer.input_names, scorer.output_names, (sc_dyn,),
                        opset)

    # the multi-user (jagged) scorer: two users of n0 rows, candidates split 2 / c0 - 2
    multi = ScorerGraph(fm, "matmul", multi=True).eval()
    b_dim = torch.export.Dim("B", min=1)
    rows_dim, cands_dim = torch.export.Dim("N", min=1), torch.export.Dim("Ct", min=1)
    kv_off0 = torch.tensor([0, n0, 2 * n0], dtype=torch.int64)
    cand_off0 = torch.tensor([0, 2, c0], dtype=torch.int64)
    hu0 = torch.stack([kv0[2 if NL else 0]] * 2)
    if NL:
        mu_args: tuple = (torch.cat([kv0[0]] * 2, 1), torch.cat([kv0[1]] * 2, 1), kv_off0, hu0,
                          cand0, cand_off0)
        mu_dyn: tuple = ({1: rows_dim}, {1: rows_dim}, {0: b_dim + 1}, {0: b_dim},
                         {0: cands_dim}, {0: b_dim + 1})
    else:
        mu_args = (hu0, cand0, cand_off0)
        mu_dyn = ({0: b_dim}, {0: cands_dim}, {0: b_dim + 1})
    mu_proto = _to_onnx(multi, mu_args, multi.input_names, multi.output_names, (mu_dyn,), opset)

    manifest = _manifest(engine, model, fm, encoder, scorer, opset, variant)
    graphs = {"user_encoder": (enc_proto, ENCODER_FILE), "scorer": (sc_proto, SCORER_FILE),
              "scorer_multi": (mu_proto, MULTI_SCORER_FILE)}

    def write(tmp: Path) -> None:
        files, proto_of = {}, {role: proto for role, (proto, _) in graphs.items()}
        for role, (proto, name) in graphs.items():
            written = _save_graph(proto, tmp / name, engine.fingerprint, role, external_data)
            files[role] = written
        _write_side_files(tmp, ds, manifest)
        for role in graphs:
            g = manifest["graphs"][role]
            g["ir_version"] = int(proto_of[role].ir_version)
            g["sha256"] = _sha256(files[role][0])
            g["bytes"] = files[role][0].stat().st_size
            if len(files[role]) > 1:
                g["external_data"] = {"file": files[role][1].name,
                                      "sha256": _sha256(files[role][1]),
                                      "bytes": files[role][1].stat().st_size}
        if int8:
            manifest["variants"] = {"int8": _quantize_int8(tmp, manifest)}
        if verify:
            manifest["verification"] = _verify(tmp, engine, manifest)
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        shareable(tmp)  # a served folder, not a private temporary one

    atomic_write_dir(out, write)
    return manifest


def export_onnx(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                dataset: Any = None, data_dir: str | os.PathLike | None = None,
                opset: int = DEFAULT_OPSET, attention: str = "auto", verify: bool = True,
                external_data: bool | str = "auto", int8: bool = False) -> dict[str, Any]:
    """Export the fine-tuning checkpoint ``checkpoint_dir`` (kind ``srp4ctr``) to ``out_dir``:
    ``user_encoder.onnx``, ``scorer.onnx``, ``scorer_multi.onnx``, ``manifest.json`` and the
    serving tables ``serving.json`` / ``serving.npz``. See the module docstring for the graphs'
    layout.

    Args:
        dataset / data_dir: the prepared dataset the model was trained on, as for
            :meth:`Engine.load <srp4ctr.engine.Engine.load>` (its id maps and behaviour rules
            go into the folder).
        opset: ONNX opset (18 ..; default 20; the ``Attention`` op needs 23).
        attention: the scorer's attention, ``"matmul"``, ``"attention"`` (the ONNX op) or
            ``"auto"`` (the measured best: ``"matmul"``).
        verify: run both graphs in ONNX Runtime against the engine (random histories of length
            1 and ``max_len``, 1 and 257 candidates) and record the largest differences in the
            manifest; :class:`~srp4ctr.errors.InputError` if they exceed 1e-5. Skipped, and
            said so in the manifest, when onnxruntime is not installed.
        external_data: keep the weights in ``<graph>.onnx.data`` (``"auto"``: above 1 GiB).
        int8: also write ``scorer.int8.onnx`` and ``scorer_multi.int8.onnx``, ONNX Runtime's
            dynamic int8 quantisation of the scorers (int8 weights and per-item tables,
            activations quantised per call), served by ``srp4ctr.serving.Scorer.load(...,
            precision="int8")``. Not equal to fp32 (the manifest records the largest
            difference on random inputs): measured on a MovieLens-100k model at +0.0002 AUC,
            1.2x faster and 3.8x smaller (``bench/serving_variants.py``); check it on your
            own validation split before serving it.

    ``out_dir`` is written atomically (a temporary sibling folder renamed into place); an
    existing ``out_dir`` is replaced only when it is empty or an earlier export.

    Returns:
        the manifest (a JSON-able dict).

    Raises:
        CheckpointError: not an SRP4CTR fine-tuning checkpoint, or not of ``dataset``.
        InputError: bad arguments, an ``out_dir`` that holds something else, a verification
            failure.
    """
    from .engine import Engine

    engine = Engine.load(checkpoint_dir, dataset=dataset, data_dir=data_dir)
    return export_engine(engine, out_dir, opset=opset, attention=attention, verify=verify,
                         external_data=external_data, int8=int8)


#: what ``int8=True`` quantises: the weight MatMul/Gemm nodes and the per-item tables (Gather)
INT8_OP_TYPES = ("MatMul", "Gemm", "Gather")


def _quantize_int8(tmp: Path, manifest: dict) -> dict[str, Any]:
    """``scorer.int8.onnx`` / ``scorer_multi.int8.onnx`` next to the fp32 scorers."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise InputError("int8=True needs onnxruntime (its quantization tools)") from None
    out: dict[str, Any] = {
        "how": "onnxruntime.quantization.quantize_dynamic, QInt8 weights, op types "
               f"{list(INT8_OP_TYPES)}; activations quantised per call",
        "graphs": {}}
    for role in ("scorer", "scorer_multi"):
        src = tmp / manifest["graphs"][role]["file"]
        dst = src.with_name(src.stem + ".int8.onnx")
        logging.disable(logging.WARNING)  # its advice to pre-process first, on the root logger
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                             op_types_to_quantize=list(INT8_OP_TYPES))
        finally:
            logging.disable(logging.NOTSET)
        out["graphs"][role] = {"file": dst.name, "sha256": _sha256(dst),
                               "bytes": dst.stat().st_size}
    return out


def _check_out_dir(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    try:
        m = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        ok = isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{out}: not empty and not an earlier ONNX export; refusing to replace it")


def _check_features(ds, model) -> None:
    missing = [f for f in model.encoder.behaviour_group if f not in _COMPUTABLE and f != ds.kind]
    if missing:
        raise InputError(f"behaviour fields {missing} have no serving rule to export")


def _write_side_files(tmp: Path, ds, manifest: dict) -> None:
    from srp4ctr._files import sha256_file
    from srp4ctr.data.dataset import save_serving_tables

    names = save_serving_tables(ds, tmp)
    manifest["tables"]["files"] = {n: {"bytes": (tmp / n).stat().st_size,
                                       "sha256": sha256_file(tmp / n)} for n in names}


def _manifest(engine, model, fm: FoldedModel, encoder: UserEncoderGraph, scorer: ScorerGraph,
              opset: int, variant: str) -> dict[str, Any]:
    import onnx

    from srp4ctr.data import features as feat

    ds, cfg = engine.dataset, model.config
    NL, H, Dh, d, h1, M = (fm.n_layers, fm.n_heads, fm.head_dim, fm.d_model, fm.h1,
                           cfg.n_queries)
    L = int(cfg.max_len)
    V = ds.n_items + 2
    kv_shape = [NL, "n", H, Dh]
    f32, i64 = "float32", "int64"

    enc_in = [
        _io_spec("hist_item", i64, ["n"], "internal item ids of the history, oldest first; "
                 "0 = padding", range=[0, V - 1]),
        _io_spec("hist_len", i64, [], "real positions (the rest is right padding): n for an "
                 "unpadded history; 0 with n = 1 (one padding position) for an empty history",
                 range=[0, "n"]),
    ]
    for f in encoder.behaviour_fields:
        enc_in.append(_io_spec(f"hist_{f}", i64, ["n"], f"behaviour field {f!r} tokens",
                               range=[0, int(ds.vocab[f]) - 1]))
    for f in encoder.user_fields:
        enc_in.append(_io_spec(f"user_{f}", i64, [], f"user field {f!r} token (0 = unknown)",
                               range=[0, int(ds.vocab[f]) - 1]))
    enc_out = []
    if NL:
        enc_out += [
            _io_spec("k", f32, kv_shape, "keys of every FG-BERT layer; rows >= hist_len are "
                     "padding and not part of the cache"),
            _io_spec("v", f32, kv_shape, "values of every FG-BERT layer (rows as k)"),
        ]
    enc_out.append(_io_spec("head_user", f32, [h1], "the head's first layer on the user part, "
                            "bias included"))
    if "qtokens" in encoder.output_names:
        enc_out.append(_io_spec("qtokens", f32, [M, d], "Q-Former tokens (not needed to score)"))
    if "pooled" in encoder.output_names:
        enc_out.append(_io_spec("pooled", f32, [d], "mean final hidden state (ablation)"))

    sc_in = []
    if NL:
        sc_in += [_io_spec("k", f32, kv_shape, "a cache's keys (n >= 1; an empty history is "
                           "one all-zero row)"),
                  _io_spec("v", f32, kv_shape, "a cache's values, same shape as k")]
    sc_in += [
        _io_spec("head_user", f32, [h1], "a cache's head_user"),
        _io_spec("cand_item", i64, ["C"], "internal item ids of the candidates; n_items + 1 "
                 "is the out-of-vocabulary item", range=[1, V - 1]),
    ]
    sc_out = [_io_spec("probs", f32, ["C"], "click probabilities"),
              _io_spec("logits", f32, ["C"], "logits (probs = sigmoid(logits))")]

    mu_in = []
    if NL:
        mu_in += [_io_spec("k", f32, [NL, "N", H, Dh], "the users' caches' keys concatenated "
                           "along the rows (each user >= 1 row; an empty history is one "
                           "all-zero row)"),
                  _io_spec("v", f32, [NL, "N", H, Dh], "their values, same shape as k"),
                  _io_spec("kv_offsets", i64, ["B+1"], "user b's K/V rows are "
                           "kv_offsets[b]:kv_offsets[b+1]; 0 first, N last, increasing")]
    mu_in += [
        _io_spec("head_user", f32, ["B", h1], "each user's head_user"),
        _io_spec("cand_item", i64, ["Ct"], "the users' candidates concatenated, user by user",
                 range=[1, V - 1]),
        _io_spec("cand_offsets", i64, ["B+1"], "user b's candidates are "
                 "cand_item[cand_offsets[b]:cand_offsets[b+1]]; 0 first, Ct last, "
                 "non-decreasing"),
    ]
    mu_out = [_io_spec("probs", f32, ["Ct"], "click probabilities, in cand_item's order"),
              _io_spec("logits", f32, ["Ct"], "logits")]

    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model_fingerprint": engine.fingerprint,
        "checkpoint": None if engine.checkpoint is None else Path(engine.checkpoint).name,
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint, "n_items": int(ds.n_items),
                    "n_users": int(ds.n_users)},
        "model_config": cfg.to_dict(),
        "opset": opset,
        "attention": variant,
        "dims": {
            "NL": NL, "H": H, "Dh": Dh, "d": d, "h1": h1, "M": M if model.qformer else 0,
            "n": {"min": 1, "max": L, "what": "history positions fed to the encoder / K-V rows "
                  "of a cache"},
            "C": {"min": 1, "max": None, "what": "candidates per scorer call (an empty list "
                  "needs no call)"},
            "B": {"min": 1, "max": None, "what": "users per scorer_multi call"},
            "N": {"min": 1, "max": None, "what": "K/V rows of all users of a scorer_multi call"},
            "Ct": {"min": 1, "max": None, "what": "candidates of all users of a scorer_multi "
                   "call"},
        },
        "graphs": {
            "user_encoder": {"file": ENCODER_FILE, "inputs": enc_in, "outputs": enc_out},
            "scorer": {"file": SCORER_FILE, "inputs": sc_in, "outputs": sc_out},
            "scorer_multi": {
                "file": MULTI_SCORER_FILE, "inputs": mu_in, "outputs": mu_out,
                "what": "several users in one call (jagged: offsets per user); equal to scoring "
                        "each user alone, at a cost that grows with Ct x N (every candidate's "
                        "scores against all rows, other users' masked out)"},
        },
        "input_rules": [
            ("every input has exactly the dtype given (int64 ids, float32 cache tensors); "
             "ONNX Runtime refuses any other"),
            ("k and v have the same shape [NL, n, H, Dh] with NL, H, Dh as in dims and "
             "1 <= n <= max_len; head_user has shape [h1]"),
            ("cache tensors are finite (no NaN or inf) and come from an encoder with the same "
             "model_fingerprint"),
            ("ids lie in the ranges given: a larger one fails inside the graph, a negative "
             "one would be read from the end of a table (Gather semantics), so refuse both"),
            ("an empty history is encoded with n = 1 (one padding position, all ids 0) and "
             "hist_len = 0; its cache has n = 0 K/V rows and is scored with one all-zero K/V "
             "row"),
            "an empty candidate list gives an empty result without calling the scorer",
        ],
        "tables": {"what": "the dataset's serving tables (raw item and user id maps, item "
                           "and user feature tables, behaviour-value rules, vocabularies): "
                           "srp4ctr.data.dataset.load_serving_tables reads them, and its "
                           "encode_user_history / encode_items turn raw histories and ids "
                           "into the encoder's and scorer's inputs exactly as in training",
                   "n_items": int(ds.n_items), "oov_item": int(ds.oov_item),
                   "raw_id_kind": "int" if ds.item_raw.dtype.kind in "iu" else "str",
                   "user_fields": list(encoder.user_fields), "files": {}},
        "history": {
            "max_len": L,
            "keys": ["item_id", "timestamp"] + ([ds.kind] if ds.kind else []) + ["user_id"],
            "behaviour_kind": ds.kind,
            "behaviour_values": None if ds.value_vocab is None else list(ds.value_vocab),
            "behaviour_fields": list(ds.behaviour_fields),
            "order": "interactions sorted by (timestamp, raw item id), stable; behaviour fields "
                     "computed over the whole history; the last max_len kept",
            "value_rule": "token = 1 + index of the raw value in behaviour_values",
            "gap": {"first": feat.GAP_FIRST, "zero": feat.GAP_ZERO,
                    "log_base": feat.GAP_LOG_BASE, "max_log2": feat.GAP_MAX_LOG2},
            "time_rule": feat.GAP_RULE,
            "timestamps": "unix seconds (integers; floats are floored)",
        },
        "producer": {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                     "exporter": "torch.onnx.export(dynamo=True)"},
    }


# --------------------------------------------------------------------------------------------
# verification in ONNX Runtime


VERIFY_ATOL = 1e-5


def _verify(folder: Path, engine, manifest: dict) -> dict[str, Any]:
    """Run both graphs against the engine on random encoded histories and candidates."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed"}
    if engine.dtype != torch.float32 or engine.device.type != "cpu":
        from .engine import Engine

        engine = Engine.from_model(_cpu_model(engine), engine.dataset,
                                   fingerprint=engine.fingerprint)
    ds = engine.dataset
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=["CPUExecutionProvider"])
    sc = ort.InferenceSession(str(folder / SCORER_FILE), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    enc_inputs = {i["name"]: i for i in manifest["graphs"]["user_encoder"]["inputs"]}
    mu = ort.InferenceSession(str(folder / MULTI_SCORER_FILE), opts,
                              providers=["CPUExecutionProvider"])
    worst = {"encoder": 0.0, "probs": 0.0, "multi_probs": 0.0}
    L = int(engine.max_len)
    users: list[tuple[dict, Any]] = []  # (encoder outputs, engine cache)
    for n in sorted({1, L}) + [0]:
        if n == 0:  # an empty history: one padding position, hist_len 0
            arrays = {"hist_item": np.zeros(1, np.int64), "hist_len": np.asarray(0, np.int64)}
            for f in ds.behaviour_fields:
                arrays[f"hist_{f}"] = np.zeros(1, np.int64)
            for f, table in ds.user_table.items():
                arrays[f"user_{f}"] = np.asarray(table[0], dtype=np.int64)
            feed = {name: arrays[name] for name in enc_inputs}
            outs = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, feed)))
            empty = {"hist_item": np.zeros(0, np.int64), "hist_len": np.asarray(0, np.int64),
                     **{f"hist_{f}": np.zeros(0, np.int64) for f in ds.behaviour_fields}}
            users.append((outs, engine._caches([empty], [None])[0]))
            continue
        arrays = {"hist_item": rng.integers(1, ds.n_items + 2, size=n).astype(np.int64),
                  "hist_len": np.asarray(n, dtype=np.int64)}
        for f in ds.behaviour_fields:
            arrays[f"hist_{f}"] = rng.integers(1, ds.vocab[f], size=n).astype(np.int64)
        for f, table in ds.user_table.items():
            arrays[f"user_{f}"] = np.asarray(table[min(1, len(table) - 1)], dtype=np.int64)
        feed = {name: arrays[name] for name in enc_inputs}
        outs = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, feed)))
        cache = engine._caches([arrays], [None])[0]
        ref = {k: t.detach().float().cpu().numpy() for k, t in cache.tensors().items()}
        users.append((outs, cache))
        for name, got in outs.items():
            worst["encoder"] = max(worst["encoder"], float(np.abs(got - ref[name]).max()))
        for C in (1, 257):
            ids = rng.integers(1, ds.n_items + 2, size=C).astype(np.int64)
            feed = {"head_user": outs["head_user"], "cand_item": ids}
            if "k" in outs:
                feed.update(k=outs["k"], v=outs["v"])
            probs = sc.run(["probs"], feed)[0]
            with torch.no_grad():
                want = torch.sigmoid(engine._logits_one(
                    cache, torch.as_tensor(ids, device=engine.device))).cpu().numpy()
            worst["probs"] = max(worst["probs"], float(np.abs(probs - want).max()))
    # several users in one scorer_multi call (one with no candidates) against each alone
    counts = [3, 0, 7][: len(users)] + [2] * max(0, len(users) - 3)
    ids = rng.integers(1, ds.n_items + 2, size=sum(counts)).astype(np.int64)
    cand_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    feed = {"head_user": np.stack([o["head_user"] for o, _ in users]), "cand_item": ids,
            "cand_offsets": cand_off}
    if "k" in users[0][0]:
        feed["k"] = np.concatenate([o["k"] for o, _ in users], axis=1)
        feed["v"] = np.concatenate([o["v"] for o, _ in users], axis=1)
        feed["kv_offsets"] = np.concatenate(
            [[0], np.cumsum([o["k"].shape[1] for o, _ in users])]).astype(np.int64)
    probs = mu.run(["probs"], feed)[0]
    with torch.no_grad():
        want = np.concatenate([torch.sigmoid(engine._logits_one(
            c, torch.as_tensor(ids[cand_off[b]:cand_off[b + 1]], device=engine.device))
        ).cpu().numpy() for b, (_, c) in enumerate(users) if counts[b]])
    worst["multi_probs"] = float(np.abs(probs - want).max())
    int8 = None
    if manifest.get("variants", {}).get("int8"):
        q = ort.InferenceSession(str(folder / manifest["variants"]["int8"]["graphs"]["scorer"]
                                     ["file"]), opts, providers=["CPUExecutionProvider"])
        int8 = 0.0
        for outs, cache in users:
            ids = rng.integers(1, ds.n_items + 2, size=257).astype(np.int64)
            feed = {"head_user": outs["head_user"], "cand_item": ids}
            if "k" in outs:
                feed.update(k=outs["k"], v=outs["v"])
            ref = sc.run(["probs"], feed)[0]
            int8 = max(int8, float(np.abs(q.run(["probs"], feed)[0] - ref).max()))
    if max(worst.values()) > VERIFY_ATOL:
        raise InputError(f"the exported graphs disagree with the engine by more than "
                         f"{VERIFY_ATOL}: {worst}")
    out = {"max_abs_diff": worst, "atol": VERIFY_ATOL, "onnxruntime": ort.__version__,
           "machine": platform.machine()}
    if int8 is not None:
        out["int8_max_abs_diff_vs_fp32"] = int8  # a quantised model: recorded, not a check
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder; :class:`~srp4ctr.errors.CheckpointError` (an
    ``InputError``) if absent, of another format or of another version."""
    return read_export_manifest(Path(folder))


# --------------------------------------------------------------------------------------------
# command line: ``srp4ctr export-onnx``


def cli_export_onnx(args: argparse.Namespace) -> int:
    """Handler of ``srp4ctr export-onnx``."""
    import logging
    import sys

    logging.getLogger(__name__).info(
        f"export-onnx: exporting {args.checkpoint} (three graphs, then the check in ONNX "
        "Runtime: about a minute)...")
    m = export_onnx(args.checkpoint, args.out, dataset=args.dataset_dir, data_dir=args.data_dir,
                    opset=args.opset, attention=args.attention, verify=not args.no_verify,
                    external_data=True if args.external_data else "auto", int8=args.int8)
    out = Path(args.out)
    summary = {
        "out": str(out),
        "files": sorted(p.name for p in out.iterdir()),
        "model_fingerprint": m["model_fingerprint"],
        "dataset": m["dataset"],
        "opset": m["opset"],
        "attention": m["attention"],
        "verification": m.get("verification"),
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
