"""Teach the model a new class from a few labelled images: a new bundle, the old classes untouched.

    add_class("fetal_head", "ultrasound", images="imgs/", masks="masks/", output="my_bundle")

What it does (one home for the CLI's ``automedsam add-class`` and the bundle's ``add_class.yaml``):

1. checks everything before any work: the name (and aliases) are new, the folders exist, every
   image has a mask of its size and the mask is not empty (one line naming the file otherwise);
2. appends the class to a copy of the bundle's vocabulary (``configs/classes.json``: the next id;
   a modality the vocabulary lacks is added with min-max normalisation) and grows the model's
   class table by one row, the existing rows kept bit for bit;
3. caches the new images' frozen-encoder embeddings (and the box-prompted teacher) with the
   project's :class:`~automedsam.data.cache.EmbeddingCache`, plus a few cached slices of the
   shared development data of *other* modalities as negatives (the new class asked of them must
   answer "not here");
4. trains the new class's row of the class table and (``class_head``, default) its own copy of
   the class prompt encoder's class-dependent parts (:mod:`automedsam.class_adapters`, used for
   its id only), everything else frozen, on the joint loss
   of training (region + pixel + distillation from the box-prompted teacher + presence): the old
   classes' answers are the same bit for bit, by construction (checked before writing);
5. writes the new bundle: ``configs/classes.json``, ``configs/metadata.json``'s ``channel_def``,
   ``models/model.pt``; the rest is copied from the source bundle.

Resumable: the work state (``<output>/.add_class/``: options, checkpoint every few steps) lives in
the output folder until the bundle is written; the same call carries on from the last checkpoint.
The output folder holds nothing else until the end (no half-written bundle).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import classes as vocabulary

__all__ = ["AddClassError", "add_class", "find_pairs", "DEFAULT_NEGATIVES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
WORK = ".add_class"
# shared development datalists whose cached slices are the negatives: (datalist, cases, slice step)
DEFAULT_NEGATIVES: tuple[tuple[str, int, int], ...] = (("kvasir", 12, 1), ("shenzhen", 12, 1), ("totalseg", 1, 3))


class AddClassError(ValueError):
    """A problem with the options or the data of ``add_class`` (one line, naming the file)."""


def _stem(p: Path) -> str:
    name = p.name
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def find_pairs(images: str | os.PathLike, masks: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by file name without extension (``a.png`` <-> ``a.png`` or
    ``a_mask.png``/``a_seg.png``)."""
    img_dir, mask_dir = Path(images), Path(masks)
    for what, d in (("images", img_dir), ("masks", mask_dir)):
        if not d.is_dir():
            raise AddClassError(f"{d}: {what} folder not found")
    imgs = sorted(p for p in img_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not imgs:
        raise AddClassError(f"{img_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    by_stem: dict[str, Path] = {}
    for m in sorted(p for p in mask_dir.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)):
        s = _stem(m)
        for tag in ("_mask", "_seg", "_label", "_gt", "_Annotation"):
            if s.endswith(tag):
                s = s[: -len(tag)]
        by_stem.setdefault(s, m)
    pairs = []
    for p in imgs:
        m = by_stem.get(_stem(p))
        if m is None:
            raise AddClassError(f"{p}: no mask for this image in {mask_dir} (expected a file named {_stem(p)}.*)")
        pairs.append((p, m))
    return pairs


def _check_pair(image: Path, mask: Path) -> None:
    """One line naming the file when a mask does not fit its image or is empty."""
    from .data.io import InputError, load_image, load_label

    try:
        like = load_image(image)
    except InputError as e:
        raise AddClassError(str(e)) from None
    try:
        label = load_label(mask, like)
    except InputError as e:
        raise AddClassError(str(e)) from None
    if not np.any(np.asarray(label) > 0):
        raise AddClassError(f"{mask}: empty mask (no foreground pixel); every training image needs its class outlined")


def _pick(items: list, n: int | None, seed: int) -> list:
    if not n or n >= len(items):
        return list(items)
    idx = np.random.default_rng(seed).permutation(len(items))[: int(n)]
    return [items[i] for i in sorted(idx)]


def _negative_entries(spec, base_dir) -> list[dict]:
    from .data.datalist import default_data_dir, load_datalist

    base = Path(base_dir) if base_dir else default_data_dir()
    out = []
    if not base.is_dir():
        return out
    for name, n, step in spec:
        try:
            es = load_datalist(name, base_dir=base, split="training")
        except (FileNotFoundError, ValueError):
            continue
        for e in es[: int(n)]:
            out.append(dict(e, slice_step=int(step)))
    return out


class _Samples:
    """(embedding, class id, mask, teacher, present) items from the cache: positives (the new class
    on its images) and negatives (the new class on other modalities' slices)."""

    def __init__(self, cache, entries: list[dict], class_id: int, num_views: int = 1):
        self.cache, self.items = cache, []
        for e in entries:
            rec = cache.case_record(e)
            for k in cache.select_slices(rec, e.get("slice_step", 1)):
                present = class_id in rec["classes"][k]
                for v in range(num_views if present else 1):  # augmented views of the new images
                    self.items.append((e, k, v, present))
        self.class_id = class_id
        self.pos = [i for i, it in enumerate(self.items) if it[3]]
        self.neg = [i for i, it in enumerate(self.items) if not it[3]]
        self._memo: dict[int, dict] = {}

    def get(self, i: int) -> dict:
        if i not in self._memo:
            e, k, v, present = self.items[i]
            d = self.cache.get(e, k, view=v) if v else self.cache.get(e, k)
            mask = torch.zeros(1, 256, 256)
            teacher = torch.zeros(1, 256, 256)
            has_teacher = False
            hit = np.nonzero(d["class_ids"] == self.class_id)[0] if present else []
            if len(hit):
                j = int(hit[0])
                mask = torch.from_numpy(d["masks"][j].astype(np.float32))[None]
                if "teacher" in d and len(d["teacher"]) > j:
                    teacher, has_teacher = torch.from_numpy(d["teacher"][j].astype(np.float32))[None], True
            self._memo[i] = {"embedding": torch.from_numpy(d["embedding"].astype(np.float16)), "mask": mask,
                             "teacher": teacher, "has_teacher": torch.tensor(has_teacher),
                             "present": torch.tensor(float(len(hit) > 0))}
        return self._memo[i]

    def batch(self, idx: Sequence[int]) -> dict:
        items = [self.get(i) for i in idx]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        out["embedding"] = out["embedding"].float()
        return out


def _write_json(path: Path, obj) -> None:
    from .atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _update_metadata(path: Path, channel_def: dict, name: str) -> None:
    meta = json.loads(path.read_text())
    pred = meta.setdefault("network_data_format", {}).setdefault("outputs", {}).setdefault("pred", {})
    pred["channel_def"] = channel_def
    _write_json(path, meta)


def add_class(name: str, modality: str, images: str | os.PathLike | None = None,
              masks: str | os.PathLike | None = None, output: str | os.PathLike | None = None, *,
              datalist: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
              bundle: str | os.PathLike | None = None, max_cases: int | None = None, aliases: Sequence[str] = (),
              colour: Sequence[int] | None = None, snomed: tuple[str, str] | None = None,
              dataset: str | None = None, steps: int = 100, batch_size: int = 4, learning_rate: float = 0.1,
              negative_ratio: float = 0.5, negatives=DEFAULT_NEGATIVES, cache_dir: str | os.PathLike | None = None,
              num_views: int = 1, device: str = "cpu", seed: int = 0, progress: bool = True,
              class_head: bool = True, head_learning_rate: float = 3e-4,
              checkpoint_every: int = 25,
              log=print) -> dict:
    """Add class ``name`` (of ``modality``) to a copy of ``bundle`` written to ``output``.

    Args:
        name: the new class (lower case, ``_`` for spaces); must not be a class or alias already.
        modality: its modality (a vocabulary modality or alias; a new one gets min-max normalisation).
        images, masks: folders of images and their masks (matched by file name), or
        datalist: a Decathlon-style JSON (``training`` entries with ``image`` and ``label``,
            relative to ``data_dir``) instead of the two folders.
        output: the new bundle's folder (must not exist, or hold an unfinished run of the same call).
        bundle: the source bundle (default: ``$AUTOMEDSAM_BUNDLE`` or the repository's).
        max_cases: teach from a seeded draw of this many images (None: all).
        aliases, colour, snomed: other spellings, overlay RGB, and ``(code, meaning)`` of the
            SNOMED CT concept for DICOM-SEG (default: "Anatomical Structure").
        dataset: the dataset name of the label rule written for these images (default ``added_<name>``).
        steps, batch_size, learning_rate, negative_ratio: training of the new row; negatives per positive.
        negatives: ``(datalist, cases, slice step)`` of the shared data whose slices are negatives.
        cache_dir: the embedding cache (default ``$AUTOMEDSAM_CACHE`` or ``cache``).
        num_views: views per new image in the cache: the plain one and ``num_views - 1`` augmented
            ones (:mod:`automedsam.data.augment`); each costs one encoder pass.
        class_head: give the class its own copy of the class prompt encoder's class-dependent
            parts (:mod:`automedsam.class_adapters`), trained with ``head_learning_rate``, besides
            its row; False: the row only.

    Returns a summary dict (class id, cases, steps, seconds, output paths, final loss).
    """
    from .pretrained import WEIGHTS_NAME, default_bundle_dir

    t_start = time.time()
    # ---- options and data, checked before any work ---------------------------------------------
    if not name or not str(name).strip() or not modality:
        raise AddClassError("give the new class's name and its modality (--class_name, --modality)")
    src = Path(bundle) if bundle else default_bundle_dir()
    if not (src / "configs").is_dir():
        raise AddClassError(f"{src}: not a bundle folder (no configs/)")
    if output is None:
        raise AddClassError("give the output bundle folder (--output)")
    out = Path(output)
    if out.resolve() == src.resolve():
        raise AddClassError(f"{out}: the output must be a new folder, not the source bundle")
    if (datalist is None) == (images is None or masks is None):
        raise AddClassError("give either --images and --masks folders or a --datalist")
    if int(steps) < 1 or int(batch_size) < 1 or not float(learning_rate) > 0 or float(negative_ratio) < 0:
        raise AddClassError("steps and batch_size must be >= 1, learning_rate > 0, negative_ratio >= 0")
    if max_cases is not None and int(max_cases) < 1:
        raise AddClassError(f"max_cases must be >= 1, got {max_cases}")
    if int(num_views) < 1:
        raise AddClassError(f"num_views must be >= 1, got {num_views}")
    old_vocab = vocabulary.read_vocabulary(src / "configs" / vocabulary.VOCABULARY_FILE)
    key = vocabulary._key(name)
    dataset = dataset or f"added_{key}"
    typ = {"code": str(snomed[0]), "scheme": "SCT", "meaning": str(snomed[1])} if snomed else None
    try:
        new_vocab = vocabulary.add_class_entry(old_vocab, key, modality, aliases=aliases, colour=colour,
                                               type_code=typ, dataset=dataset, label_rule={"threshold": 0})
    except vocabulary.VocabularyError as e:
        raise AddClassError(str(e)) from None
    new_id = new_vocab["classes"][-1]["id"]
    mod = new_vocab["classes"][-1]["modality"]
    if datalist is not None:
        from monai.data import load_decathlon_datalist

        from .data.datalist import default_data_dir

        dl_path = Path(datalist)
        if not dl_path.is_file():
            raise AddClassError(f"{dl_path}: datalist not found")
        base = Path(data_dir) if data_dir else default_data_dir()
        raw = load_decathlon_datalist(str(dl_path), is_segmentation=True, data_list_key="training", base_dir=base)
        pairs = [(Path(e["image"]), Path(e["label"])) for e in raw]
        for p in (x for pr in pairs for x in pr):
            if not p.is_file():
                raise AddClassError(f"{p}: file of datalist {dl_path} not found")
    else:
        pairs = find_pairs(images, masks)
    pairs = _pick(pairs, max_cases, seed)
    options = {"name": key, "modality": mod, "class_id": new_id, "source_bundle": str(src.resolve()),
               "cases": [[str(a), str(b)] for a, b in pairs], "steps": int(steps), "batch_size": int(batch_size),
               "learning_rate": float(learning_rate), "negative_ratio": float(negative_ratio), "seed": int(seed),
               "dataset": dataset, "num_views": int(num_views), "class_head": bool(class_head),
               "head_learning_rate": float(head_learning_rate)}
    work = out / WORK
    state_file, ckpt_file = work / "options.json", work / "checkpoint.pt"
    if out.exists():
        if not state_file.is_file():
            raise AddClassError(f"{out}: output folder already exists; give a new folder")
        if json.loads(state_file.read_text()) != options:
            raise AddClassError(f"{out}: holds an unfinished add-class run with other options; "
                                f"give a new folder or the same options to resume it")
    for img, msk in pairs:
        _check_pair(img, msk)

    # ---- the new vocabulary, the grown model -------------------------------------------------------
    from .data.cache import EmbeddingCache
    from .engine import save_atomic
    from .losses import UncertaintyWeightedLoss
    from .pretrained import network_from_bundle

    work.mkdir(parents=True, exist_ok=True)
    if not state_file.is_file():
        _write_json(state_file, options)
    previous = vocabulary.VOCABULARY_PATH or dict(vocabulary.VOCABULARY)
    try:
        net = network_from_bundle(src, decoder_runtime="eager")  # the source vocabulary's class table
        net.load_trainable(src / "models" / WEIGHTS_NAME)
        before = {k: v.clone() for k, v in net.trainable_state_dict().items()}
        vocabulary.load_vocabulary(new_vocab)
        net.grow_classes(vocabulary.NUM_CLASSES)
        net = net.to(device)
        table = net.class_prompt_encoder.class_embed.weight
        n_old = table.shape[0] - 1

        # ---- embeddings ----------------------------------------------------------------------------
        cache = EmbeddingCache(cache_dir or os.environ.get("AUTOMEDSAM_CACHE", "cache"), backbone=net.backbone.name,
                               device=device)
        own = [{"image": str(a), "label": str(b), "dataset": dataset, "modality": mod, "case": a.name}
               for a, b in pairs]
        neg = _negative_entries(negatives, data_dir)
        if not neg:
            log("add-class: no shared development data found for negatives: 'not here' on other modalities is not taught")
        cache.build(own, progress=progress, **({"num_views": int(num_views)} if num_views > 1 else {}))
        for step_ in sorted({e.get("slice_step", 1) for e in neg}):
            cache.build([e for e in neg if e.get("slice_step", 1) == step_], slice_step=step_, progress=progress)
        samples = _Samples(cache, own + neg, new_id, int(num_views))
        if not samples.pos:
            raise AddClassError("no image kept its mask at the model's input size (masks too small?)")

        # ---- training the new row ------------------------------------------------------------------
        # in eval mode: the class prompt encoder's fixed evaluation step and noise, so the row is
        # taught for exactly the path inference takes (and nothing else has a training mode that
        # matters here: no dropout or batch norm)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        table.requires_grad_(True)
        keep = torch.zeros_like(table)
        keep[n_old:] = 1.0
        table.register_hook(lambda g: g * keep)
        groups = [{"params": [table], "lr": float(learning_rate)}]
        if class_head:  # its own copy of the class-dependent parts, used for its id only
            from .class_adapters import make_head

            net.class_heads[str(new_id)] = make_head(net.class_prompt_encoder).to(device).requires_grad_(True)
            groups.append({"params": list(net.class_heads[str(new_id)].parameters()), "lr": float(head_learning_rate)})
        loss_fn = UncertaintyWeightedLoss(terms=("region", "pixel", "distill", "presence"), learn_weights=False)
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(steps))
        step, history = 0, []
        if ckpt_file.is_file():
            ck = torch.load(ckpt_file, map_location=device, weights_only=False)
            with torch.no_grad():
                table[n_old:] = ck["rows"].to(table)
            if class_head:
                net.class_heads[str(new_id)].load_state_dict(ck["head"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            step, history = int(ck["step"]), list(ck["history"])
            log(f"add-class: resuming from step {step} of {steps} ({ckpt_file})")
        n_neg = int(round(batch_size * negative_ratio / (1 + negative_ratio))) if samples.neg else 0
        n_pos = max(1, int(batch_size) - n_neg)
        from tqdm.auto import tqdm

        bar = tqdm(total=int(steps), initial=step, desc=f"teaching {key}", unit="step", disable=not progress,
                   dynamic_ncols=True)
        try:
            while step < int(steps):
                rng = np.random.default_rng([int(seed), step])
                idx = list(rng.choice(samples.pos, n_pos, replace=len(samples.pos) < n_pos))
                if n_neg:
                    idx += list(rng.choice(samples.neg, n_neg, replace=len(samples.neg) < n_neg))
                b = {k: v.to(device) for k, v in samples.batch(idx).items()}
                ids = torch.full((len(idx),), new_id, dtype=torch.long, device=device)
                pred = net(embeddings=b["embedding"], class_ids=ids)
                loss = loss_fn(pred.logits, b["mask"], pred.presence_logit, b["present"], b["teacher"], b["has_teacher"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}")
                if step % int(checkpoint_every) == 0 or step == int(steps):
                    save_atomic({"step": step, "rows": table.detach()[n_old:].cpu(), "optimizer": opt.state_dict(),
                                 "head": net.class_heads[str(new_id)].state_dict() if class_head else None,
                                 "scheduler": sched.state_dict(), "history": history}, ckpt_file)
        finally:
            bar.close()
        net.eval()

        # ---- the old classes are untouched, then the bundle ------------------------------------------
        after = net.trainable_state_dict()
        for k, v in before.items():
            w = after[k][: v.shape[0]] if k == net.CLASS_TABLE else after[k]
            if not torch.equal(v.cpu(), w.cpu()):
                raise RuntimeError(f"add-class changed {k}: the old classes would not answer as before")
        staging = work / "bundle"
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns(WORK, "__pycache__", ".ipynb_checkpoints"))
        _write_json(staging / "configs" / vocabulary.VOCABULARY_FILE, new_vocab)
        if (staging / "configs" / "metadata.json").is_file():
            _update_metadata(staging / "configs" / "metadata.json", vocabulary.channel_def(), key)
        save_atomic({k: v.detach().cpu() for k, v in after.items()}, staging / "models" / WEIGHTS_NAME)
        for item in staging.iterdir():
            target = out / item.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(item, target)
        shutil.rmtree(work)
    finally:
        vocabulary.load_vocabulary(previous)
    summary = {"class": key, "class_id": new_id, "modality": mod, "cases": len(pairs),
               "positives": len(samples.pos), "negatives": len(samples.neg), "steps": int(steps),
               "final_loss": float(np.mean(history[-20:])) if history else None,
               "seconds": round(time.time() - t_start, 1), "output": str(out)}
    log(f"add-class: {key} (id {new_id}, {mod}) taught from {len(pairs)} images in {summary['seconds']:.0f} s; "
        f"bundle written to {out}")
    return summary
