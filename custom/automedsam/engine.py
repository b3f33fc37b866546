"""Glue between AutoMedSAM and MONAI's engines (``SupervisedTrainer``/``SupervisedEvaluator``).

Training and validation run on the embedding cache: a batch is a dict with ``embedding``
(B,256,64,64), ``class_id`` (B,), ``mask`` (B,1,256,256) in the decoder's low-res grid,
``present`` (B,), ``teacher`` (B,1,256,256) box-prompted MedSAM logits and ``has_teacher`` (B,).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Events
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.metrics import Metric
from monai.handlers import CheckpointSaver
from monai.inferers import Inferer

from .atomic import atomic_write
from .classes import CLASSES
from .losses import UncertaintyWeightedLoss

TARGET_KEYS = ("mask", "present", "teacher", "has_teacher", "class_id")


def prepare_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """(inputs, targets, args, kwargs) for MONAI's engines: embeddings in, a dict of targets out."""
    inputs = batchdata["embedding"].to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    targets = {k: batchdata[k].to(device=device, non_blocking=non_blocking) for k in TARGET_KEYS if k in batchdata}
    kwargs = {"class_ids": targets["class_id"]}
    if "box" in batchdata:  # the ground-truth box (backbone-input pixels): a reverse diffusion's target
        kwargs["target_boxes"] = batchdata["box"].to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    return inputs, targets, (), kwargs


class ClassPromptTrainInferer(Inferer):
    """Training forward: raw outputs the joint loss needs (``presence_logit`` None for a network
    built with ``presence=False``: it has no presence to learn, and a ``presence`` loss term then
    refuses to run). ``target_boxes`` (from :func:`prepare_batch`) reach a reverse-diffusion prompt
    encoder (``reverse_steps`` >= 2), whose per-item ``denoise_error`` the ``denoise`` term weighs."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, class_ids=None, target_boxes=None, **kwargs) -> dict:
        encoder = getattr(network, "module", network).class_prompt_encoder
        if encoder.reverse is None:
            target_boxes = None
        pred = network(embeddings=inputs, class_ids=class_ids, target_boxes=target_boxes)
        has_head = encoder.presence_head is not None
        return {"logits": pred.logits, "presence_logit": pred.presence_logit if has_head else None, "iou": pred.iou,
                "denoise_error": pred.denoise_error}


class ClassPromptEvalInferer(Inferer):
    """Validation forward: presence-blanked probabilities (B,1,256,256) in the low-res grid."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, class_ids=None, **kwargs) -> torch.Tensor:
        return network(embeddings=inputs, class_ids=class_ids).probabilities()


class EngineLoss(nn.Module):
    """``loss_function(pred, targets)`` for the engines, around :class:`UncertaintyWeightedLoss`.
    Keeps the last components so that :class:`LossWeightsHandler` can log them."""

    def __init__(self, **kwargs):
        super().__init__()
        self.loss = UncertaintyWeightedLoss(**kwargs)
        self.last: dict[str, float] = {}

    def forward(self, pred: dict, targets: dict) -> torch.Tensor:
        parts = self.loss.components(pred["logits"], targets["mask"], pred["presence_logit"], targets.get("present"),
                                     targets.get("teacher"), targets.get("has_teacher"), pred.get("denoise_error"))
        self.last = {k: float(v.detach()) for k, v in parts.items()}
        return self.loss.combine(parts)


class LossWeightsHandler:
    """Puts the learned loss weights exp(-s_i) and the last loss components into
    ``engine.state.metrics`` (so ``StatsHandler``/``TensorBoardStatsHandler``/MLflow log them), and
    at the end of every epoch logs the weights' trajectory: one line per epoch on the ``logger``
    and, with ``output_dir``, a row in ``loss_weights.csv`` (epoch, then exp(-s_i) and the epoch's
    mean L_i per term), so a run shows whether the weights moved and settled."""

    def __init__(self, loss: EngineLoss, output_dir: str | None = None, logger_name: str = "automedsam.train"):
        self.loss = loss
        self.output_dir = output_dir
        self.logger = logging.getLogger(logger_name)
        self._sums: dict[str, list[float]] = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._sums.clear())
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def __call__(self, engine) -> None:
        for k, w in self.loss.loss.weights().items():
            engine.state.metrics[f"weight_{k}"] = w
        for k, v in self.loss.last.items():
            engine.state.metrics[f"loss_{k}"] = v
            acc = self._sums.setdefault(k, [0.0, 0])
            acc[0] += v
            acc[1] += 1

    def epoch_completed(self, engine) -> None:
        weights = self.loss.loss.weights()
        means = {k: self._sums[k][0] / self._sums[k][1] for k in weights if self._sums.get(k, [0, 0])[1]}
        self.logger.info(f"Epoch {engine.state.epoch} loss weights exp(-s): "
                         + ", ".join(f"{k} {w:.3f} (mean L {means[k]:.4f})" if k in means else f"{k} {w:.3f}"
                                     for k, w in weights.items()))
        if self.output_dir is None or (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0):
            return
        # one row per epoch; a resumed run redoes the epochs after its checkpoint, so their rows go
        path = os.path.join(self.output_dir, "loss_weights.csv")
        header = "epoch," + ",".join([f"weight_{k}" for k in weights] + [f"mean_loss_{k}" for k in weights])
        rows = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows = [r for r in f.read().splitlines()[1:] if r and int(r.split(",")[0]) < engine.state.epoch]
        rows.append(f"{engine.state.epoch}," + ",".join([f"{w:.6f}" for w in weights.values()]
                                                         + [f"{means[k]:.6f}" if k in means else "" for k in weights]))
        text = "\n".join([header] + rows) + "\n"
        atomic_write(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text))


def slice_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, gt).sum() / s)


def slice_nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float, spacing=None) -> float:
    """Normalised surface Dice of two 2D/3D binary masks (MONAI's implementation)."""
    from monai.metrics import compute_surface_dice

    if not gt.any() and not pred.any():
        return 1.0
    if not gt.any() or not pred.any():
        return 0.0
    p = torch.as_tensor(pred[None, None].astype(np.float32))
    g = torch.as_tensor(gt[None, None].astype(np.float32))
    p = torch.cat([1 - p, p], 1)
    g = torch.cat([1 - g, g], 1)
    val = compute_surface_dice(p, g, class_thresholds=[tolerance], include_background=False, spacing=spacing)
    return float(val.reshape(-1)[0])


def _pred_and_label(output: dict) -> tuple:
    return output["pred"], output["label"]


class PerClassSliceMetrics(Metric):
    """Per class: Dice and NSD on slices where the class is present, and the fraction of slices
    where it is absent that are answered with an empty mask. ``compute`` returns a dict;
    ignite puts each entry into ``engine.state.metrics`` and ``mean_dice`` is the key metric."""

    def __init__(self, threshold: float = 0.5, nsd_tolerance: float = 2.0, output_transform=None, device="cpu"):
        self.threshold = threshold
        self.nsd_tolerance = nsd_tolerance
        super().__init__(output_transform=output_transform or _pred_and_label, device=device)

    def reset(self) -> None:
        self.dice = defaultdict(list)
        self.nsd = defaultdict(list)
        self.empty = defaultdict(list)

    def update(self, output) -> None:
        pred, targets = output
        probs = torch.as_tensor(pred).detach().cpu().numpy()
        gts = targets["mask"].detach().cpu().numpy() > 0.5
        ids = targets["class_id"].detach().cpu().numpy().reshape(-1)
        for p, g, c in zip(probs, gts, ids):
            pm = p[0] > self.threshold
            gm = g[0]
            self.add(int(c), pm, gm)

    def add(self, cid: int, pm: np.ndarray, gm: np.ndarray) -> None:
        if gm.any():
            self.dice[cid].append(slice_dice(pm, gm))
            self.nsd[cid].append(slice_nsd(pm, gm, self.nsd_tolerance))
        else:
            self.empty[cid].append(float(not pm.any()))

    def compute(self) -> dict:
        out = {}
        for cid in sorted(set(self.dice) | set(self.empty)):
            name = CLASSES[cid]
            if self.dice[cid]:
                out[f"dice_{name}"] = float(np.mean(self.dice[cid]))
                out[f"nsd_{name}"] = float(np.mean(self.nsd[cid]))
            if self.empty[cid]:
                out[f"empty_{name}"] = float(np.mean(self.empty[cid]))
        dices = [v for k, v in out.items() if k.startswith("dice_")]
        out["mean_dice"] = float(np.mean(dices)) if dices else 0.0
        return out

    def completed(self, engine, name: str) -> None:
        result = self.compute()
        engine.state.metrics.update(result)
        engine.state.metrics[name] = result["mean_dice"]


def trainable_parameters(network: nn.Module, loss: nn.Module | None = None,
                         loss_weight_lr: float | None = None) -> list[dict]:
    """What the optimiser steps, as parameter groups: the network's unfrozen parameters, and the
    loss's learned weights in a group of their own, without weight decay and at
    ``loss_weight_lr`` (None: the optimiser's learning rate). Adam moves a parameter by about its
    learning rate per step whatever the gradient, so at the network's rate (2e-4) the weights
    cannot travel from 0 to their optimum ``log L_i`` (-1 to -4) in a training run."""
    groups = [{"params": [p for p in network.parameters() if p.requires_grad]}]
    weights = [p for p in loss.parameters() if p.requires_grad] if loss is not None else []
    if weights:
        group = {"params": weights, "weight_decay": 0.0}
        if loss_weight_lr is not None:
            group["lr"] = float(loss_weight_lr)
        groups.append(group)
    return groups


class TrainableState:
    """Checkpoint view of AutoMedSAM holding only what training changes (the frozen backbone
    comes from its package or file), for MONAI's ``CheckpointSaver``/``CheckpointLoader``."""

    def __init__(self, network: nn.Module):
        self.network = network

    def _net(self):
        return getattr(self.network, "module", self.network)  # unwrap DistributedDataParallel

    def state_dict(self) -> dict:
        return self._net().trainable_state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self._net().load_trainable(state)


class EpochSampling:
    """Redraw the dataset's epoch draws (``set_epoch``: for SliceSamples the negative subsample,
    the class-balanced positives and each slice's cached view) and the distributed sampler's
    shuffle at the start of every epoch.

    With ``seed``, every random stream training draws from is also reseeded from (seed, epoch)
    at the start of each epoch: torch's global generator (diffusion timesteps and noise),
    numpy's and Python's, and a ``RandomSampler``'s own generator. An epoch's randomness then
    depends on its number only, so a run resumed from an epoch checkpoint (model, optimiser,
    scheduler, loss weights, epoch restored) repeats exactly what the uninterrupted run did."""

    def __init__(self, dataset, sampler=None, seed: int | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.seed = seed

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch
        if self.seed is not None:
            self.reseed(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def reseed(self, epoch: int) -> None:
        import random

        s = int(np.random.SeedSequence([int(self.seed), int(epoch)]).generate_state(1, dtype=np.uint32)[0])
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)
        if isinstance(getattr(self.sampler, "generator", None), torch.Generator):
            # a new generator, not a reseeded one: the previous epoch's sampler iterator still
            # holds the old one and draws once more from it when it runs out
            self.sampler.generator = torch.Generator().manual_seed(s)


# ------------------------------------------------------------------ atomic checkpoints and resume


def save_atomic(obj, path) -> str:
    """``torch.save`` atomically and durably (see :func:`automedsam.atomic.atomic_write`)."""
    from .atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return str(atomic_write(path, write, durable=True))


class AtomicDiskSaver(BaseSaveHandler):
    """Save handler for ignite's ``Checkpoint``: atomic writes (:func:`save_atomic`), and the
    checkpoint a new one replaces is deleted only after the new one is in place (ignite deletes
    first, which leaves no checkpoint at all if the process dies in between). Rank 0 writes."""

    def __init__(self, dirname, filename: str | None = None):
        self.dirname = str(dirname)
        self.filename = filename  # a fixed name (best_model.pt), else ignite's
        self._pending: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            save_atomic(checkpoint, os.path.join(self.dirname, name))
            for old in self._pending:
                if old != name:
                    try:
                        os.remove(os.path.join(self.dirname, old))
                    except FileNotFoundError:
                        pass
        self._pending = []

    def remove(self, filename: str) -> None:
        name = self.filename or filename
        if name not in self._pending:
            self._pending.append(name)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing through :class:`AtomicDiskSaver`:
    MONAI's own disk saver writes straight to the final name (``atomic=False``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for ck in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ck is not None:
                ck.save_handler = AtomicDiskSaver(self.save_dir, getattr(ck.save_handler, "filename", None))


class ValidationState:
    """Checkpoint view of the validation side of training: the evaluator's best metric and the
    best-model saver's record of it. Without it a resumed run forgets the best score and its
    next validation overwrites ``best_model.pt`` whether or not it is better."""

    def __init__(self, evaluator, best_saver=None):
        self.evaluator = evaluator
        self.best_saver = best_saver

    def _checkpoint(self):
        return getattr(self.best_saver, "_key_metric_checkpoint", None) if self.best_saver is not None else None

    def state_dict(self) -> dict:
        st = self.evaluator.state
        ck = self._checkpoint()
        return {"best_metric": float(getattr(st, "best_metric", -1.0)),
                "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1)),
                "best_saved": [[float(p), str(f)] for p, f in (ck._saved if ck is not None else [])]}

    def load_state_dict(self, state: dict) -> None:
        st = self.evaluator.state
        st.best_metric = float(state.get("best_metric", -1.0))
        st.best_metric_epoch = int(state.get("best_metric_epoch", -1))
        ck = self._checkpoint()
        if ck is not None:
            from ignite.handlers.checkpoint import Checkpoint

            ck._saved = [Checkpoint.Item(p, f) for p, f in state.get("best_saved", [])]


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest epoch checkpoint a training run left in ``output_dir`` (None: start afresh)."""
    import glob
    import os
    import re

    found = glob.glob(os.path.join(output_dir, "checkpoint_epoch=*.pt"))
    if not found:
        return None
    return max(found, key=lambda p: int(re.search(r"epoch=(\d+)", p).group(1)))
