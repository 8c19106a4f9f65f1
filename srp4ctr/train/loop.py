"""Pre-training (FG-BERT), fine-tuning (SRP4CTR and baselines) and evaluation.

Both loops run as one process or under ``torchrun`` with DistributedDataParallel: each rank
trains on its shard of every epoch's shuffled samples, evaluation is sharded and gathered, and
rank 0 writes the checkpoint, ``metrics.json`` and the learning-curve PNG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srp4ctr import metrics
from srp4ctr._memory import drop_mapped_pages, release_memory
from srp4ctr.bundle import write_bundle_files
from srp4ctr.data.recorded import dataset_record
from srp4ctr.errors import CheckpointError, InputError
from srp4ctr.models import SRP4CTR
from srp4ctr.models.checkpoint import load_model, save_checkpoint
from srp4ctr.models.registry import model_entry, model_kinds
from srp4ctr.train.config import TrainConfig
from srp4ctr.train.distributed import World, all_mean, gather_objects, init_world

log = logging.getLogger(__name__)

#: ModelConfig fields of the encoder's weight shapes: a fine-tuning run started from a
#: pre-trained encoder takes them from it (a CLI run) or must match them. (``item_only`` may
#: differ: the side-field embeddings an item-only BERT lacks start from random weights.)
ENCODER_FIELDS = ("d_model", "n_layers", "n_heads", "ffn_mult", "max_len")

#: the resolved settings every run folder holds (the ``--config`` format)
RUN_CONFIG_FILE = "run.yaml"

# --------------------------------------------------------------------------------------------
# helpers


def seed_everything(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Seed Python, numpy and torch; returns a generator on ``device`` seeded alike (torch
    draws on a device only from a generator of that device type)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    """A progress bar on stderr when ``enabled`` and stderr is a terminal (never in a log)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def metrics_text(metrics: dict, keys=None) -> str:
    """``auc 0.8132  gauc 0.6932  logloss 0.5292``: the float metrics of ``metrics``."""
    keys = [k for k in (keys or metrics) if isinstance(metrics.get(k), float)]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _epoch_line(desc: str, rec: dict, epochs: int, best: bool) -> str:
    """One labelled line per epoch: what trained, which epoch, the training loss and speed,
    then the validation metrics."""
    val = {k: v for k, v in rec.items() if k not in _TRAIN_KEYS}
    return (f"{desc} epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.4f} "
            f"({rec['train_samples_per_s']:.0f} samples/s, {rec['train_seconds']:.1f} s) | "
            f"validation {metrics_text(val)}" + ("  (best so far)" if best else ""))


def _to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if device == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def iterate_batches(
    dataset, indices: np.ndarray, batch_size: int, *, lengths: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``dataset`` over ``indices`` in order (or length-bucketed and shuffled).

    With ``lengths`` and ``rng``, indices are sorted by history length inside windows of 64
    batches and the batches are shuffled: much less padding, still a random order.
    """
    if lengths is not None and rng is not None and len(indices) > batch_size:
        window = batch_size * 64
        chunks = []
        for s in range(0, len(indices), window):
            w = indices[s : s + window]
            w = w[np.argsort(lengths[w], kind="stable")]
            chunks.extend(w[i : i + batch_size] for i in range(0, len(w), batch_size))
        order = rng.permutation(len(chunks))
        batches = [chunks[i] for i in order]
    else:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    get = getattr(dataset, "get_batch", None)
    for b in batches:
        if get is not None:
            yield get(b)
        else:
            yield dataset.collate([dataset[int(i)] for i in b])


def _shard(indices: np.ndarray, world: World) -> np.ndarray:
    if not world.distributed:
        return indices
    # equal shard sizes so every rank runs the same number of steps (DDP needs it)
    n = (len(indices) // world.size) * world.size
    return indices[:n][world.rank :: world.size]


class _Call(nn.Module):
    """Makes a model method the ``forward`` so DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


def _wrap(model: nn.Module, method: str, world: World, device: str) -> nn.Module:
    m = _Call(model, method)
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [world.local_rank] if device.startswith("cuda") else None
        m = DDP(m, device_ids=ids, find_unused_parameters=True)
    return m


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def plot_curves(history: list[dict], path: Path, title: str, keys: tuple[str, ...]) -> bool:
    """Training loss and validation metrics per epoch as a PNG (skipped without matplotlib);
    whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return False
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set_title("train loss")
    axes[0].set_xlabel("epoch")
    for ax, k in zip(axes[1:], keys):
        ax.plot(epochs, [h.get(k, float("nan")) for h in history], marker="o", color="C1")
        ax.set_title(f"validation {k}")
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _set_threads(cfg: TrainConfig) -> None:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict_ctr(model: nn.Module, dataset, *, batch_size: int = 1024, device: str = "cpu",
                world: World | None = None, indices: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """Click probabilities for every sample of a CTR dataset, or the samples ``indices``
    (sharded across ranks)."""
    world = world or World()
    model.eval()
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
    mine = idx[world.rank :: world.size] if world.distributed else idx
    users, labels, probs, order = [], [], [], []
    for s in range(0, len(mine), batch_size):
        b = mine[s : s + batch_size]
        batch = next(iterate_batches(dataset, b, len(b)))
        logits = model(_to_device(batch, device)).float().cpu()
        probs.append(torch.sigmoid(logits).numpy())
        users.append(batch["user"].numpy())
        labels.append(batch["label"].numpy())
        order.append(b)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
    part = (cat(order, np.int64), cat(users, np.int64), cat(labels, np.float32),
            cat(probs, np.float32))
    parts = gather_objects(world, part)
    o = np.concatenate([p[0] for p in parts])
    perm = np.argsort(o, kind="stable")
    return {
        "user": np.concatenate([p[1] for p in parts])[perm],
        "label": np.concatenate([p[2] for p in parts])[perm],
        "prob": np.concatenate([p[3] for p in parts])[perm],
    }


def ctr_metrics(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, gAUC, logloss (:func:`srp4ctr.metrics.ctr_metrics`) and ``n`` of a prediction
    (``user``, ``label``, ``prob``)."""
    m = metrics.ctr_metrics(pred["label"], pred["prob"], pred["user"])
    return {"auc": float(m["auc"]), "gauc": float(m["gauc"]), "logloss": float(m["logloss"]),
            "n": len(pred["label"])}


#: the most full-ranking logits one evaluation batch computes at once (128 MB in fp32); above
#: it, ranks are counted over blocks of _BLOCK_LOGITS logits (32 MB)
_LOGITS_BUDGET = 1 << 25
_BLOCK_LOGITS = 1 << 23


def eval_indices(n: int, cfg: TrainConfig) -> np.ndarray | None:
    """The evaluated samples of a split of ``n``: all (None), or with ``cfg.eval_max_samples`` a
    fixed subset of that many (seeded by ``cfg.seed``, in sample order)."""
    from srp4ctr.data.samples import subset_indices

    return subset_indices(n, cfg.eval_max_samples, cfg.seed)


@torch.no_grad()
def next_item_metrics(
    encoder: nn.Module, dataset, *, ks=(10,), batch_size: int = 512, device: str = "cpu",
    world: World | None = None, indices: np.ndarray | None = None,
) -> dict[str, float]:
    """HR@k and NDCG@k for next-item prediction, full ranking and sampled negatives.

    ``dataset`` is a :class:`~srp4ctr.data.samples.NextItemDataset` built with ``n_negatives``
    (100 by convention): each target is ranked against those items, drawn uniformly (with
    replacement) from the items its user never interacted with, with the dataset's seed — the
    same draw for every model. Full ranking scores every item (padding and out-of-vocabulary
    ids excluded by the model). Ranks are pessimistic: ties count against the target.
    ``indices``: only those samples. When a batch's logits over every item would exceed
    :data:`_LOGITS_BUDGET` (a large catalogue), the ranks are counted over blocks of items
    instead (:func:`_ranks_by_item_blocks`: the item table is read once per batch, not once per
    few users).
    """
    world = world or World()
    encoder.eval()
    vocab = int(encoder.spec.n_item_ids)
    blocked = int(batch_size) * vocab > _LOGITS_BUDGET
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
    mine = idx[world.rank :: world.size] if world.distributed else idx
    full_ranks, sampled_ranks = [], []
    n_neg = None
    for s in range(0, len(mine), batch_size):
        b = mine[s : s + batch_size]
        batch = next(iterate_batches(dataset, b, len(b)))
        target = batch["target_item"].long()
        neg = batch["neg_item"].long()
        n_neg = neg.shape[1]
        if blocked:
            hidden = encoder.next_item_hidden(_to_device(batch, device))
            full, sampled = _ranks_by_item_blocks(encoder, hidden, target.to(hidden.device),
                                                  neg.to(hidden.device))
            full_ranks.append(np.asarray(full.cpu()))
            sampled_ranks.append(np.asarray(sampled.cpu()))
            continue
        logits = encoder.next_item_logits(_to_device(batch, device)).float().cpu()
        full_ranks.append(np.asarray(metrics.rank_of_target(logits, target)))
        tgt = logits.gather(1, target[:, None])[:, 0]
        sampled_ranks.append(np.asarray(metrics.sampled_rank(tgt, logits.gather(1, neg))))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    parts = gather_objects(world, (cat(full_ranks), cat(sampled_ranks), n_neg))
    fr = np.concatenate([p[0] for p in parts])
    sr = np.concatenate([p[1] for p in parts])
    n_neg = next((p[2] for p in parts if p[2] is not None), 0)
    out: dict[str, float] = {"n": len(fr)}
    for k in ks:
        out[f"hr@{k}"] = float(metrics.hit_rate_at_k(fr, k))
        out[f"ndcg@{k}"] = float(metrics.ndcg_at_k(fr, k))
        out[f"hr@{k}_sampled{n_neg}"] = float(metrics.hit_rate_at_k(sr, k))
        out[f"ndcg@{k}_sampled{n_neg}"] = float(metrics.ndcg_at_k(sr, k))
    return out


def _ranks_by_item_blocks(encoder: nn.Module, hidden: torch.Tensor, target: torch.Tensor,
                          neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-ranking ranks, sampled ranks) of ``target`` for the next-item states ``hidden``
    [B, d], counting the items that score above (or equal to) the target block by block of
    :data:`_BLOCK_LOGITS` // B items: the ranks of :func:`metrics.rank_of_target` (pessimistic)
    without a [B, V] matrix. The target's own column is left out of the counts, the padding and
    OOV ids never count."""
    head = encoder.heads["item"]
    table = encoder.embeddings.weight("item")
    proj = head.project(hidden).float()
    tgt = (proj * table[target].float()).sum(1) + head.bias[target].float()
    rows = torch.arange(target.shape[0], device=proj.device)
    excluded = (0, encoder.spec.oov_item)
    above = torch.zeros(target.shape[0], dtype=torch.long, device=proj.device)
    step = max(1, _BLOCK_LOGITS // max(1, target.shape[0]))
    for s in range(0, table.shape[0], step):
        e = min(s + step, table.shape[0])
        sc = F.linear(proj, table[s:e].float(), head.bias[s:e].float())
        for i in excluded:
            if s <= i < e:
                sc[:, i - s] = float("-inf")
        own = (target >= s) & (target < e)
        sc[rows[own], target[own] - s] = float("-inf")
        above += (sc >= tgt[:, None]).sum(1)
    neg_scores = (proj[:, None, :] * table[neg].float()).sum(-1) + head.bias[neg].float()
    return 1 + above, metrics.sampled_rank(tgt, neg_scores)


# --------------------------------------------------------------------------------------------
# training


def _train_epochs(
    *, model: nn.Module, step_model: nn.Module, dataset, cfg: TrainConfig, world: World,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor], validate: Callable[[], dict[str, float]],
    monitor: str, lengths: np.ndarray | None, desc: str, pretrained_params=(),
) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """The shared epoch loop: train, validate, early-stop, keep the best weights.
    ``pretrained_params`` train at ``cfg.lr * cfg.pretrained_lr_ratio``."""
    n = len(dataset)
    per_rank = len(_shard(np.arange(n), world))
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total = steps_per_epoch * cfg.epochs
    from srp4ctr.train.optim import make_optimizer, sparse_parameters

    opt, sched = make_optimizer(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, total_steps=total,
        warmup_steps=int(cfg.warmup_ratio * total), power=cfg.lr_power,
        end_lr_ratio=cfg.end_lr_ratio, sparse_params=sparse_parameters(model),
        scaled_params=pretrained_params, lr_ratio=cfg.pretrained_lr_ratio,
    )
    if world.is_main:
        log.info(f"{desc}: {n} training samples, up to {cfg.epochs} epochs of {steps_per_epoch} "
                 f"steps (batch {cfg.batch_size}, lr {cfg.lr:g}, {world.size} process(es) on "
                 f"{cfg.device}, {torch.get_num_threads()} thread(s)); "
                 + (f"early stopping on validation {monitor}, patience {cfg.patience}"
                    if cfg.early_stopping else "every epoch, the last one kept"))
    history: list[dict] = []
    best_value, best_state, best_epoch, bad = -math.inf, None, -1, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = _shard(rng.permutation(n), world)
        t0 = time.perf_counter()
        losses, seen = [], 0
        batches = iterate_batches(dataset, order, cfg.batch_size, lengths=lengths, rng=rng)
        bar = _progress(batches, total=steps_per_epoch, desc=f"{desc} epoch {epoch}",
                        enabled=cfg.progress and world.is_main)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            batch = _to_device(batch, cfg.device)
            loss = loss_fn(step_model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            seen += int(next(iter(batch.values())).shape[0])
        elapsed = time.perf_counter() - t0
        val = validate()
        rec = {
            "epoch": epoch,
            "train_loss": all_mean(world, float(np.mean(losses)) if losses else float("nan")),
            "train_seconds": elapsed,
            "train_samples_per_s": all_mean(world, seen / max(elapsed, 1e-9)) * world.size,
            **val,
        }
        history.append(rec)
        if world.is_main:
            log.info(_epoch_line(desc, rec, cfg.epochs, cfg.early_stopping
                                 and val[monitor] > best_value))
        if not cfg.early_stopping:  # every epoch runs; the last one is kept
            if epoch == cfg.epochs:
                best_value, best_epoch = val[monitor], epoch
                best_state = {k: v.detach() for k, v in model.state_dict().items()}
        elif val[monitor] > best_value:
            best_value, best_epoch, bad = val[monitor], epoch, 0
            # the last epoch's weights are the model's own: no copy (at 4M items one is a GB)
            best_state = ({k: v.detach() for k, v in model.state_dict().items()}
                          if epoch == cfg.epochs else
                          {k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            bad += 1
            if bad >= cfg.patience:
                if world.is_main:
                    log.info(f"{desc}: early stop after epoch {epoch} ({bad} epoch(s) without a "
                             f"better validation {monitor}); keeping epoch {best_epoch}")
                break
    assert best_state is not None
    # the optimizer and its schedule refer to each other: free their state now, not at the next
    # garbage collection (Adam's moments are twice the model: 2 GB at 4M items), and the last
    # step's gradients (as large as the model) with them
    model.zero_grad(set_to_none=True)
    del opt, sched
    release_memory()
    model.load_state_dict(best_state)
    return history, best_state, {"best_epoch": best_epoch, f"best_valid_{monitor}": best_value}


_TRAIN_KEYS = ("epoch", "train_loss", "train_seconds", "train_samples_per_s")


def _best_record(history: list[dict], epoch: int, exclude=()) -> dict:
    """The validation metrics of the kept (best) epoch — the weights were restored to it."""
    rec = next(h for h in history if h["epoch"] == epoch)
    return {k: v for k, v in rec.items() if k not in exclude}


def pretrain(
    ds, out_dir: str | os.PathLike | None, *, model_config=None, train_config: TrainConfig | None = None,
    kind: str = "fgbert", windows: bool = True,
) -> dict:
    """Pre-train an encoder of a ``"pretrain"`` kind of :mod:`srp4ctr.models.registry`: FG-BERT
    (``kind="fgbert"``) or the item-id-only BERT (``"bert"``).

    Only each user's training interactions are seen: the last ``max_len`` of them and, with
    ``windows``, every earlier non-overlapping ``max_len`` window of long users. Validation:
    next-item NDCG@10 (full ranking) of each user's first validation item; the best epoch is kept and evaluated on the
    first test item. Writes a checkpoint, ``metrics.json`` and ``curves.png`` to ``out_dir``.
    """
    from srp4ctr.data.samples import NextItemDataset, PretrainDataset
    from srp4ctr.models import ModelConfig, ModelSpec

    if kind not in model_kinds("pretrain"):
        raise InputError(f"unknown pre-training kind {kind!r}; expected one of "
                         f"{model_kinds('pretrain')}")
    entry = model_entry(kind)
    cfg = train_config or TrainConfig()
    cfg.check_device()
    mcfg = entry.configure(model_config or ModelConfig())  # saved as the checkpoint's config
    _set_threads(cfg)
    world = init_world(cfg.device)
    gen = seed_everything(cfg.seed + 1000 * world.rank, cfg.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    spec = ModelSpec.from_dataset(ds)
    model = entry.build(spec, mcfg).to(cfg.device)
    model.attach_samplers(_samplers(model, ds, cfg.device))
    train_set = PretrainDataset(ds, max_len=mcfg.max_len, windows=windows)
    # the evaluated targets (cfg.eval_max_samples) are chosen before the negatives are drawn
    subset = {"max_samples": cfg.eval_max_samples, "subset_seed": cfg.seed}
    valid_set = NextItemDataset(ds, split="valid", max_len=mcfg.max_len, n_negatives=100,
                                seed=cfg.seed, **subset)
    test_set = NextItemDataset(ds, split="test", max_len=mcfg.max_len, n_negatives=100,
                               seed=cfg.seed, **subset)
    # the set-up's temporaries (at 4M items, hundreds of MB) and the pages its scans of the
    # memory-mapped dataset made resident (at 100M events, GBs) go before training
    release_memory()
    drop_mapped_pages(*ds.arrays().values())
    step_model = _wrap(model, "pretrain_loss", world, cfg.device)

    def loss_fn(m, batch):
        out = m(batch, generator=gen)
        return out[0] if isinstance(out, tuple) else out

    def validate():
        return next_item_metrics(model, valid_set, device=cfg.device, world=world,
                                 batch_size=cfg.eval_batch_size)

    t0 = time.perf_counter()
    history, _, best = _train_epochs(
        model=model, step_model=step_model, dataset=train_set, cfg=cfg, world=world,
        loss_fn=loss_fn, validate=validate, monitor="ndcg@10", lengths=None, desc=kind,
    )
    test = next_item_metrics(model, test_set, device=cfg.device, world=world,
                             batch_size=cfg.eval_batch_size)
    valid = _best_record(history, best["best_epoch"], exclude=_TRAIN_KEYS)
    result = {
        "kind": kind,
        "dataset": dataset_record(ds),
        "valid": valid,
        "test": test,
        "history": history,
        "train_seconds": time.perf_counter() - t0,
        "sequences_per_s": float(np.median([h["train_samples_per_s"] for h in history])),
        "softmax": model.softmax_description(),
        **best,
    }
    if out_dir is not None and world.is_main:
        _save_run(out_dir, model, kind, spec, mcfg, cfg, ds, result, ("ndcg@10", "hr@10"))
    return result


def _samplers(model: nn.Module, ds, device: str) -> dict:
    """The negative samplers of ``model``'s sampled heads, from training-split frequencies."""
    from srp4ctr.models.sampled_softmax import NegativeSampler

    fields = getattr(model, "sampled_fields", [])
    if not fields:
        return {}
    counts = ds.training_counts({f: model.spec.vocab[f] for f in fields})
    out = {}
    for f in fields:
        vocab = model.spec.vocab[f]
        exclude = (0, model.spec.oov_item) if f == "item" else (0,)
        out[f] = NegativeSampler(model.config.sampler, vocab, model.config.n_sampled,
                                 counts=counts[f], exclude=exclude, device=device)
        log.info(f"{model.kind}: {f} head ({vocab} values): {out[f].describe()}")
    return out


def _run_config(ds, mcfg, cfg, section: str) -> dict:
    """The settings of a run in the format of ``--config`` files (:mod:`srp4ctr.runconfig`)."""
    rec = dataset_record(ds)
    dataset = {"name": ds.name}
    if rec["path"] is not None:
        dataset["path"] = rec["path"]
    if rec["columns"] is not None:
        dataset["columns"] = rec["columns"]
    if rec["prepared"] is not None:
        dataset["data_dir"] = str(Path(rec["prepared"]).parent)
    return {"dataset": dataset, "model": mcfg.to_dict(), section: cfg.to_dict()}


def _save_run(out_dir, model, kind, spec, mcfg, cfg, ds, result, curve_keys) -> None:
    from srp4ctr.runconfig import write_run_config

    out = Path(out_dir)
    role = model_entry(kind).role
    log.info(f"{kind}: best epoch {result['best_epoch']}; test {metrics_text(result['test'])}")
    run_cfg = _run_config(ds, mcfg, cfg, "pretrain" if role == "pretrain" else "finetune")

    def extra(tmp: Path) -> None:
        pre = result.get("pretrained") or {}
        command = (f"pretrain --kind {kind}" if role == "pretrain" else f"finetune --model {kind}"
                   + (f" --pretrained {pre['path']}" if pre.get("path") else ""))
        write_run_config(tmp / RUN_CONFIG_FILE, run_cfg,
                         f"the settings of this {kind} run: srp4ctr {command} --config "
                         f"{RUN_CONFIG_FILE} --out DIR repeats it")
        if kind == SRP4CTR.kind:
            write_bundle_files(tmp, ds)

    save_checkpoint(out, model, {
        "kind": kind,
        "model_config": mcfg.to_dict(),
        "spec": spec.to_dict(),
        "train_config": cfg.to_dict(),
        **({"pretrain_softmax": result["softmax"]} if "softmax" in result else {}),
        **({"strict_time": result["strict_time"]} if "strict_time" in result else {}),
        "dataset": dataset_record(ds),
        "metrics": {k: result[k] for k in ("valid", "test") if k in result},
    }, extra=extra)
    _write_json(out / "metrics.json", result)
    plotted = plot_curves(result["history"], out / "curves.png", f"{kind} on {ds.name}",
                          curve_keys)
    log.info(f"wrote {out}: checkpoint (config.json, model.safetensors), {RUN_CONFIG_FILE}, "
             "metrics.json" + (", curves.png" if plotted else "")
             + ("; a serving bundle (srp4ctr serve / export-onnx --run it)"
                if kind == SRP4CTR.kind else ""))


def require_two_classes(ds, negatives: str | None) -> None:
    """:class:`InputError` when the training or validation labels of ``ds`` are all one class
    and no sampled negatives are asked for (click-only data)."""
    if negatives is not None:
        return
    for split, code in (("training", 0), ("validation", 1)):
        labels = ds.label[ds.split == code]
        if labels.size and labels.min() == labels.max():
            raise InputError(
                f"every {split} label of {ds.name!r} is {int(labels[0])} (label rule: "
                f"{ds.meta.get('label_rule')}): a CTR model cannot learn from one class. "
                "For click-only data (every interaction a positive) train with sampled "
                "negatives: --negatives uni100 (TrainConfig(negatives='uni100'))")


def finetune(
    ds, out_dir: str | os.PathLike | None, *, kind: str = "srp4ctr", model_config=None,
    train_config: TrainConfig | None = None, pretrained: str | os.PathLike | None = None,
    name: str | None = None, strict_time: bool = False,
) -> dict:
    """Train a model of a ``"ctr"`` kind of :mod:`srp4ctr.models.registry` (``srp4ctr``,
    ``din``, ``bst``, ``user_vector``) with BCE.

    ``pretrained`` is a pre-training checkpoint whose encoder (embeddings and Transformer) the
    SRP4CTR / user-vector models start from; without it they start from random weights.
    Validation AUC after each epoch drives early stopping; the best epoch is evaluated on test.
    ``strict_time``: every sample's history holds only interactions strictly earlier than its
    candidate (:class:`~srp4ctr.data.samples.CTRDataset`). The result's ``test_by_popularity``
    splits the test metrics by the candidate item's training count
    (:func:`srp4ctr.train.experiment.metrics_by_popularity`).
    """
    from srp4ctr.data.samples import CTRDataset
    from srp4ctr.models import FGBERT, ModelConfig, ModelSpec

    if kind not in model_kinds("ctr"):
        raise InputError(f"unknown CTR model kind {kind!r}; expected one of {model_kinds('ctr')}")
    entry = model_entry(kind)
    cfg = train_config or TrainConfig()
    cfg.check_device()
    require_two_classes(ds, cfg.negatives)
    mcfg = model_config or ModelConfig()
    _set_threads(cfg)
    world = init_world(cfg.device)
    seed_everything(cfg.seed + 1000 * world.rank)
    torch.manual_seed(cfg.seed)
    spec = ModelSpec.from_dataset(ds)
    encoder = None
    pre_info = None
    pretrained_params: list[torch.nn.Parameter] = []
    if entry.takes_encoder:
        encoder = FGBERT(spec, mcfg)
        if pretrained is not None:
            pre, pre_cfg = load_model(pretrained, dataset=ds)
            pre_m = pre_cfg.get("model_config") or {}
            differ = {k: (pre_m.get(k), getattr(mcfg, k)) for k in ENCODER_FIELDS
                      if k in pre_m and pre_m[k] != getattr(mcfg, k)}
            if differ:
                raise InputError(
                    f"{pretrained}: the pre-trained encoder has " + ", ".join(
                        f"{k} {a}" for k, (a, _) in differ.items()) + "; the model config asks "
                    "for " + ", ".join(f"{k} {b}" for k, (_, b) in differ.items())
                    + ": fine-tune with the pre-trained architecture")
            missing, _unexpected = encoder.load_state_dict(pre.state_dict(), strict=False)
            loaded = set(pre.state_dict()) - set(missing)
            pretrained_params = [p for n, p in encoder.named_parameters() if n in loaded]
            pre_info = {"path": str(pretrained), "kind": pre_cfg["kind"],
                        "fingerprint": pre_cfg["weights_sha256"],
                        "not_pretrained": sorted(missing)}
    model = entry.build(spec, mcfg, encoder=encoder).to(cfg.device)
    strict_time = bool(strict_time)
    train_set, valid_set, test_set = (
        CTRDataset(ds, split, max_len=mcfg.max_len, negatives=cfg.negatives, seed=cfg.seed,
                   strict_time=strict_time) for split in ("train", "valid", "test"))
    stats = getattr(model, "item_statistics", None)
    if stats is not None:  # ModelConfig.item_stats: out-of-fold for the training samples
        from srp4ctr.train.item_stats import item_statistics

        if cfg.negatives is not None:
            raise InputError("ModelConfig.item_stats is not available with sampled negatives "
                             f"(negatives={cfg.negatives!r}): a positive's own interaction "
                             "would be in its item's statistics")
        own, table = item_statistics(ds, train_set.rows, train_set.extras["cand_item"],
                                     seed=cfg.seed)
        train_set.extras["cand_stats"] = own
        with torch.no_grad():
            stats.table.copy_(torch.from_numpy(table))
    release_memory()  # the set-up's temporaries and scanned dataset pages before training
    drop_mapped_pages(*ds.arrays().values())
    step_model = _wrap(model, "forward", world, cfg.device)
    bce = nn.BCEWithLogitsLoss()

    def loss_fn(m, batch):
        return bce(m(batch), batch["label"])

    def validate():
        pred = predict_ctr(model, valid_set, batch_size=cfg.eval_batch_size, device=cfg.device,
                           world=world, indices=eval_indices(len(valid_set), cfg))
        return ctr_metrics(pred)

    lengths = getattr(train_set, "hist_lengths", None)
    lengths = lengths() if callable(lengths) else lengths
    t0 = time.perf_counter()
    history, _, best = _train_epochs(
        model=model, step_model=step_model, dataset=train_set, cfg=cfg, world=world,
        loss_fn=loss_fn, validate=validate, monitor="auc", lengths=lengths, desc=name or kind,
        pretrained_params=pretrained_params,
    )
    valid = _best_record(history, best["best_epoch"], exclude=_TRAIN_KEYS)
    test_idx = eval_indices(len(test_set), cfg)
    test_pred = predict_ctr(model, test_set, batch_size=cfg.eval_batch_size, device=cfg.device,
                            world=world, indices=test_idx)
    test = ctr_metrics(test_pred)
    # predict_ctr returns the samples in index order: the candidates in the same order
    cand = test_set.extras["cand_item"]
    cand = cand if test_idx is None else cand[np.sort(test_idx)]
    from srp4ctr.train.experiment import metrics_by_popularity

    result = {
        "kind": kind,
        "name": name or kind,
        "dataset": dataset_record(ds),
        "pretrained": pre_info,
        "strict_time": strict_time,
        "valid": valid,
        "test": test,
        "test_by_popularity": metrics_by_popularity(ds, test_pred["user"], test_pred["label"],
                                                    test_pred["prob"], cand),
        "history": history,
        "train_seconds": time.perf_counter() - t0,
        "samples_per_s": float(np.median([h["train_samples_per_s"] for h in history])),
        **best,
    }
    if out_dir is not None and world.is_main:
        _save_run(out_dir, model, kind, spec, mcfg, cfg, ds, result, ("auc", "logloss"))
    return result


def evaluate(path: str | os.PathLike, ds, *, split: str = "test", batch_size: int = 1024,
             device: str = "cpu") -> dict:
    """Metrics of a saved checkpoint on ``split`` (CTR metrics or next-item metrics; a CTR run
    trained under the strict-time protocol is evaluated under it, as its config records)."""
    from srp4ctr.data.samples import CTRDataset, NextItemDataset

    model, cfg = load_model(path, dataset=ds, device=device)
    tc = TrainConfig.from_dict(cfg.get("train_config", {}))
    max_len = cfg["model_config"].get("max_len", 200)
    if model_entry(cfg["kind"]).role == "pretrain":
        data = NextItemDataset(ds, split=split, max_len=max_len, n_negatives=100, seed=tc.seed)
        res = next_item_metrics(model, data, device=device, batch_size=batch_size)
    else:
        strict = cfg.get("strict_time", False)
        if not isinstance(strict, bool):
            raise CheckpointError(f"{path}: config.json strict_time must be true or false, got "
                                  f"{strict!r}")
        data = CTRDataset(ds, split, max_len=max_len, negatives=tc.negatives, seed=tc.seed,
                          strict_time=strict)
        res = {**ctr_metrics(predict_ctr(model, data, batch_size=batch_size, device=device)),
               "strict_time": strict}
    return {"kind": cfg["kind"], "split": split, "checkpoint": str(path), **res}
