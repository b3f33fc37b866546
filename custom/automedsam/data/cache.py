"""On-disk cache of frozen-encoder embeddings (and the box-prompted teacher) per slice.

The image encoder is the expensive step (~1.5-2 s per slice on a laptop CPU), so training
runs it once per slice and trains on this cache. One file per slice holds:

* ``embedding``: the (256,64,64) image embedding, fp16;
* per class present in the slice's label: the low-res (256x256) GT mask (bit-packed), the GT
  box in backbone-input pixels and the box-prompted teacher's low-res logits (fp16);
* the slice geometry (:class:`~automedsam.data.preprocess.InputGeometry`).

A slice's key is the sha256 of everything its numbers depend on: cache format, backbone
name and checkpoint sha256, preprocessing key, orientation, input file content sha256,
label file content sha256 and label mapping, slice index; for an augmented view (``view`` >= 1,
:mod:`automedsam.data.augment`) also the view index and the augmentation settings' hash (view 0,
the plain slice, has exactly the key it had before views existed). Changed files or settings
give new keys, so nothing is ever served stale. Files are written atomically (temporary name +
``os.replace``) and carry a sha256 of their payload, checked on every read: a corrupt file
is detected and recomputed. ``build`` skips finished slices, so a killed run resumes.
The file format and the hashes keys are made of: :mod:`automedsam.data.cache_files`.

Small per-case records (``cases/*.json``: slice count and classes present per slice, from
the label alone) let datasets enumerate samples without touching the big files.

Several processes (``torchrun ... automedsam cache``, or multi_gpu_train.yaml) share a build:
with ``rank``/``world_size`` each encodes the slices whose key falls to it
(:func:`owner_rank`) and writes only those files and the case records falling to it, so no
two processes ever write one file; the files are the ones a single process would write. The
share depends on the key alone, so overlapping builds (a volume in both the training and the
validation list) give a slice to the same rank every time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..classes import label_to_classes
from .augment import views_for
from .cache_files import CACHE_FORMAT, CacheError, decode_entry, encode_entry, file_sha256, label_rules, \
    owner_rank, sha_json
from .cache_files import atomic_bytes as _atomic_bytes  # looked up here at each write (tests log the writes)
from .io import load_image, load_label
from .preprocess import LOW_RES, PreprocessConfig, mask_to_box, mask_to_input, mask_to_low_res, to_backbone_input

__all__ = ["CACHE_FORMAT", "CacheError", "EmbeddingCache", "build_cache", "file_sha256", "owner_rank"]


class EmbeddingCache:
    """Slice embeddings + teacher outputs on disk, keyed by content.

    Args:
        root: cache folder (created).
        backbone: a :class:`~automedsam.backbones.SamBackbone` or a backbone name (built lazily,
            only when something has to be computed).
        preprocess: intensity/resize parameters; its ``modality`` is replaced per entry by the
            entry's modality, its ``size`` must be the backbone's input size (default: it is).
        checkpoint: checkpoint path when ``backbone`` is a name (None: packaged LiteMedSAM).
        orientation: volume orientation passed to :func:`~automedsam.data.io.load_image`.
        teacher: also store the box-prompted teacher's low-res logits per present class.
        device: where the encoder runs (default: CUDA when available).
        augment: the :class:`~automedsam.data.augment.AugmentConfig` of views >= 1 (default: seed 0).
    """

    def __init__(self, root: str | os.PathLike, backbone="lite_medsam", preprocess: PreprocessConfig | None = None,
                 checkpoint: str | os.PathLike | None = None, orientation: str | None = "LPS", teacher: bool = True,
                 device: str | torch.device | None = None, augment=None):
        from ..backbones import BACKBONES, IMAGE_SIZE, default_lite_medsam_checkpoint
        from .augment import AugmentConfig

        self.augment = augment if augment is not None else AugmentConfig()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if isinstance(backbone, str):
            if backbone not in BACKBONES:
                raise ValueError(f"unknown backbone '{backbone}'; valid: {', '.join(BACKBONES)}")
            self.backbone_name = backbone
            self._backbone = None
            if checkpoint is None and backbone == "lite_medsam":
                checkpoint = default_lite_medsam_checkpoint()
            if checkpoint is None:
                raise ValueError(f"backbone {backbone} needs a checkpoint path")
            self.checkpoint = str(checkpoint)
        else:
            self.backbone_name = backbone.name
            self._backbone = backbone
            self.checkpoint = str(checkpoint or backbone.checkpoint)
        size = IMAGE_SIZE[self.backbone_name]
        preprocess = preprocess or PreprocessConfig(size=size)
        if preprocess.size != size:
            raise ValueError(f"preprocess size {preprocess.size} does not match {self.backbone_name}'s input {size}")
        self.preprocess = preprocess
        self.orientation = orientation
        self.teacher = bool(teacher)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self._checkpoint_sha: str | None = None
        self.stats = {"encoded": 0, "corrupt": 0}

    def __getstate__(self):
        # DataLoader workers only read: do not ship the model; it is rebuilt lazily if needed.
        state = dict(self.__dict__)
        state["_backbone"] = None
        return state

    # ---------------------------------------------------------------- keys

    @property
    def backbone(self):
        if self._backbone is None:
            from ..backbones import build_backbone

            self._backbone = build_backbone(self.backbone_name, self.checkpoint)
            # the fast CPU path when available: it agrees with eager to ~1e-5, far below fp16 storage
            self._backbone.set_encoder_runtime("auto")
        return self._backbone

    @property
    def checkpoint_sha256(self) -> str:
        if self._checkpoint_sha is None:
            self._checkpoint_sha = file_sha256(self.checkpoint)
        return self._checkpoint_sha

    def config_for(self, entry: dict) -> PreprocessConfig:
        return self.preprocess.with_modality(entry["modality"])

    def _hashes(self, entry: dict) -> dict:
        label = entry.get("label")
        return {"image": file_sha256(entry["image"]), "label": file_sha256(label) if label else None,
                "dataset": entry["dataset"], "rules": sha_json(label_rules(entry["dataset"])),
                "orientation": self.orientation}

    def case_key(self, entry: dict) -> str:
        return sha_json({"format": CACHE_FORMAT, **self._hashes(entry)})[:40]

    def slice_key(self, entry: dict, index: int, view: int = 0) -> str:
        """The content key of one slice's ``view`` (all that its cached numbers depend on)."""
        extra = {"view": int(view), "augment": self.augment.key(entry["modality"], entry["dataset"])} if view else {}
        return sha_json({
            "format": CACHE_FORMAT, "backbone": self.backbone_name, "checkpoint": self.checkpoint_sha256,
            "preprocess": self.config_for(entry).key(), "teacher": self.teacher, "slice": int(index),
            **self._hashes(entry), **extra,
        })[:48]

    def view_seed(self, entry: dict, index: int, view: int) -> int:
        """The augmentation seed of a view (``index`` -1: its volume-level draw), from content."""
        h = self._hashes(entry)
        return self.augment.view_seed(f"{h['image']}|{h['label']}", index, view)

    def path_for(self, key: str) -> Path:
        return self.root / "slices" / key[:2] / f"{key}.npc"

    # ---------------------------------------------------------------- case records

    def case_record(self, entry: dict, label_slices: np.ndarray | None = None, n_slices: int | None = None,
                    write: bool | None = None) -> dict:
        """{num_slices, classes: [[class ids present] per slice], ...} from the label alone (cached).

        A missing record is computed and, with ``write``, saved; ``write=None`` saves it only in
        the process that owns the case (:func:`owner_rank` of the case key, torch.distributed's or
        $RANK/$WORLD_SIZE's rank): other ranks compute it in memory instead of writing it too.
        """
        key = self.case_key(entry)
        path = self.root / "cases" / f"{key}.json"
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
                if rec.get("format") == CACHE_FORMAT:
                    return rec
            except (json.JSONDecodeError, OSError):
                pass  # rewrite below
        if entry.get("label"):
            if label_slices is None:
                like = load_image(entry["image"], orientation=self.orientation)
                label_slices = load_label(entry["label"], like)
            classes = [sorted(int(c) for c, m in label_to_classes(lab, entry["dataset"]).items() if m.any())
                       for lab in label_slices]
        else:
            if n_slices is None:
                n_slices = load_image(entry["image"], orientation=self.orientation).num_slices
            classes = [[] for _ in range(n_slices)]
        rec = {"format": CACHE_FORMAT, "image": str(entry["image"]), "label": entry.get("label"),
               "dataset": entry["dataset"], "modality": entry["modality"], "num_slices": len(classes),
               "classes": classes}
        if write is None:
            rank, world_size = _dist_rank()
            write = owner_rank(key, world_size) == rank
        if write:
            _atomic_bytes(path, json.dumps(rec).encode())
        return rec

    @staticmethod
    def select_slices(record: dict, slice_step: int = 1, only_labelled_slices: bool = False,
                      all_labelled_slices: bool = False) -> list[int]:
        """Slice indices k with k % slice_step == 0 (or, with ``all_labelled_slices``, any slice
        holding a class) and, when asked, a labelled class."""
        step = max(1, int(slice_step))
        return [k for k in range(record["num_slices"])
                if (k % step == 0 or (all_labelled_slices and record["classes"][k]))
                and (not only_labelled_slices or record["classes"][k])]

    # ---------------------------------------------------------------- files

    def _encode_file(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
        return encode_entry(key, arrays, meta)

    def load(self, key: str) -> dict:
        """The arrays of a cached slice; raises CacheError if missing or corrupt."""
        return decode_entry(self.path_for(key), key)

    def is_valid(self, key: str, verify: bool = True) -> bool:
        """Whether a finished entry exists (with ``verify``: and passes its checksum)."""
        path = self.path_for(key)
        if not path.is_file():
            return False
        if not verify:
            return True
        try:
            self.load(key)
            return True
        except CacheError:
            self.stats["corrupt"] += 1
            return False

    def get(self, entry: dict, index: int, recompute: bool = True, view: int = 0) -> dict:
        """A cached slice (view); a missing or corrupt entry is recomputed (``recompute``) or raises."""
        key = self.slice_key(entry, index, view)
        try:
            return self.load(key)
        except CacheError:
            if not recompute:
                raise
        self._compute_case(entry, [index], batch_size=1, view=view)
        return self.load(key)

    # ---------------------------------------------------------------- computing

    @torch.inference_mode()
    def _compute_case(self, entry: dict, indices: Sequence[int], batch_size: int = 4, on_done=None,
                      loaded=None, view: int = 0) -> None:
        """Encode ``indices`` of one case (their ``view``) and write their files."""
        cfg = self.config_for(entry)
        img = loaded[0] if loaded else load_image(entry["image"], orientation=self.orientation)
        labels = loaded[1] if loaded else (load_label(entry["label"], img) if entry.get("label") else None)
        raw, aug = img.slices, None
        if view:  # an augmented view: volume-level draw (raw intensities), then per slice below
            from .augment import ViewAugmenter

            aug = ViewAugmenter(entry["modality"], entry["dataset"], self.augment)
            raw, cfg = aug.volume(raw, cfg, self.view_seed(entry, -1, view))
        x = cfg.normalise(raw)  # whole volume: MR percentiles need it
        bb = self.backbone
        if next(bb.parameters()).device != self.device:
            bb.to(self.device)
        rules = entry["dataset"]
        for start in range(0, len(indices), max(1, int(batch_size))):
            chunk = list(indices[start:start + max(1, int(batch_size))])
            views = {k: (x[k], None if labels is None else labels[k]) for k in chunk}
            if aug:
                views = {k: aug.slice(*views[k], self.view_seed(entry, k, view)) for k in chunk}
            inputs, infos = zip(*(to_backbone_input(views[k][0], cfg.size) for k in chunk))
            emb = bb.encode(torch.stack(inputs).to(self.device)).float()
            self.stats["encoded"] += len(chunk)
            for j, k in enumerate(chunk):
                info = infos[j]
                class_masks = label_to_classes(views[k][1], rules) if labels is not None else {}
                cids, boxes, masks = [], [], []
                for cid, m in sorted(class_masks.items()):
                    if not m.any():
                        continue
                    box = mask_to_box(mask_to_input(m, info))
                    if box is None:  # vanished when resized (a few pixels)
                        continue
                    cids.append(cid)
                    boxes.append(box)
                    masks.append(mask_to_low_res(m, info))
                arrays = {
                    "embedding": emb[j].cpu().numpy().astype(np.float16),
                    "geometry": info.to_array(),
                    "class_ids": np.asarray(cids, dtype=np.int16),
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "masks": np.packbits(np.asarray(masks, dtype=np.uint8).reshape(len(cids), LOW_RES * LOW_RES),
                                         axis=-1),  # (K, 8192); K may be 0
                }
                if self.teacher:
                    if cids:
                        sparse, dense = bb.prompt(boxes=torch.as_tensor(np.stack(boxes), device=self.device))
                        logits, iou = bb.decode(emb[j:j + 1], sparse, dense)
                        arrays["teacher"] = logits[:, 0].float().clamp(-6e4, 6e4).cpu().numpy().astype(np.float16)
                        arrays["teacher_iou"] = iou[:, 0].float().cpu().numpy()
                    else:
                        arrays["teacher"] = np.zeros((0, LOW_RES, LOW_RES), np.float16)
                        arrays["teacher_iou"] = np.zeros((0,), np.float32)
                key = self.slice_key(entry, k, view)
                meta = {"case": entry.get("case", entry["image"]), "image": str(entry["image"]), "slice": int(k),
                        "backbone": self.backbone_name, "preprocess": cfg.key(), "class_ids": cids,
                        **({"view": int(view), "augment": self.augment.key(entry["modality"], entry["dataset"])}
                           if view else {})}
                _atomic_bytes(self.path_for(key), self._encode_file(key, arrays, meta))
                if on_done is not None:
                    on_done(k)

    def _clean_tmp(self, older_than_s: float = 3600.0) -> None:
        now = time.time()
        for tmp in (self.root / "slices").glob("*/.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def build(self, entries: Iterable[dict], slice_step: int = 1, only_labelled_slices: bool = False,
              batch_size: int = 4, rank: int = 0, world_size: int = 1, verify: bool = True,
              progress: bool = True, max_slices: int | None = None, num_views: int = 1,
              all_labelled_slices: bool = False) -> dict:
        """Compute every missing slice view of ``entries`` (this rank's share); returns counts.

        ``num_views``: views 0 (plain) .. K-1 (augmented) of each slice, K an int or per dataset
        (:func:`~automedsam.data.augment.views_for`), one encoder pass each; counts count views.
        Finished slices are skipped (with ``verify`` their checksums are checked first and
        corrupt ones recomputed), so a killed run resumes where it stopped. Slices and case records
        are shared between ranks by key (:func:`owner_rank`): a rank computes and writes only its
        own, so ranks run concurrently without ever writing the same file (no barrier needed).
        ``max_slices`` stops after that many computed slices (a budget).
        """
        from tqdm.auto import tqdm

        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        entries = list(entries)
        k_max = max(views_for(num_views, e["dataset"]) for e in entries) if entries else 1
        if rank == 0:
            self._clean_tmp()
        corrupt_before = self.stats["corrupt"]
        plan, total, done, planned = [], 0, 0, set()
        scan = tqdm(entries, desc="checking cache", unit="case", disable=not progress or len(entries) < 20,
                    leave=False)
        for entry in scan:
            rec = self.case_record(entry, write=owner_rank(self.case_key(entry), world_size) == rank)
            ks = [(k, v) for v in range(views_for(num_views, entry["dataset"]))
                  for k in self.select_slices(rec, slice_step, only_labelled_slices, all_labelled_slices)]
            keys = {kv: self.slice_key(entry, *kv) for kv in ks}
            # this rank's share, each slice once (a case listed twice, e.g. in two splits, is one case)
            mine = [kv for kv in ks if owner_rank(keys[kv], world_size) == rank and keys[kv] not in planned]
            planned.update(keys[kv] for kv in mine)
            todo = [kv for kv in mine if not self.is_valid(keys[kv], verify=verify)]
            total += len(mine)
            done += len(mine) - len(todo)
            if todo:
                plan.append((entry, todo))
        pending = sum(len(t) for _, t in plan)
        if max_slices is not None:
            pending = min(pending, int(max_slices))
        stats = {"slices": total, "cached": done, "computed": 0, "corrupt_recomputed": self.stats["corrupt"] -
                 corrupt_before, "rank": rank, "world_size": world_size, "cache_dir": str(self.root),
                 "num_views": num_views}
        bar = tqdm(total=pending, desc=f"encoding slices (rank {rank}/{world_size})" if world_size > 1
                   else "encoding slices", unit="slice", disable=not progress, dynamic_ncols=True)
        t0 = time.time()

        def tick(_k):
            stats["computed"] += 1
            bar.update(1)

        try:
            for v in range(k_max):  # view-major: every plain slice first, then view 1 of all, ...
                for entry, todo in plan:
                    ks, left = [k for k, w in todo if w == v], pending - stats["computed"]
                    if ks and left > 0:
                        self._compute_case(entry, ks[:left], batch_size=batch_size, on_done=tick, view=v)
        finally:
            bar.close()
        stats["seconds"] = round(time.time() - t0, 2)
        stats["remaining"] = total - done - stats["computed"]
        return stats

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.root / "slices").glob("*/*.npc"))


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_cache(datalist: str | Sequence[str], base_dir: str | None = None, cache_dir: str = "cache",
                backbone: str = "lite_medsam", checkpoint: str | None = None, max_cases: int | None = None,
                slice_step: int = 1, only_labelled_slices: bool = False, split: str = "training",
                batch_size: int = 4, rank: int | None = None, world_size: int | None = None,
                device: str | None = None, ct_level: float | None = None, ct_width: float | None = None,
                mr_lower: float | None = None, mr_upper: float | None = None, orientation: str | None = "LPS",
                teacher: bool = True, verify: bool = True, progress: bool = True, num_views: int | dict = 1,
                all_labelled_slices: bool = False) -> dict:
    """Fill the embedding cache for one or more datalists (the ``automedsam cache`` command).

    Args:
        datalist: datalist name(s) or JSON path(s); several as a list or comma-separated.
        base_dir: data folder the datalist paths are relative to (default: $AUTOMEDSAM_DATA
            or ../shared/data).
        cache_dir: where the cache lives.
        max_cases: only the first N cases of each datalist split.
        slice_step: every k-th slice of volumes; only_labelled_slices: skip slices without a class.
        split: "training", "validation", "test", "unlabelled", comma-separated, or "all".
        rank, world_size: share the work between processes (default: torch.distributed or
            $RANK/$WORLD_SIZE, so ``torchrun --nproc_per_node=N -m automedsam.cli cache ...``
            splits it N ways; see :meth:`EmbeddingCache.build`).
        device: where the encoder runs (default: cuda:$LOCAL_RANK when CUDA is there, else CPU).
        ct_level, ct_width, mr_lower, mr_upper: None: the vocabulary's (configs/classes.json).
        num_views: views per slice (1: the plain slice only; K: K-1 augmented views as well), or
            per dataset ({"totalseg": 32, "default": 8}).
    Returns: counts (slices, cached, computed, corrupt_recomputed, seconds, ...).
    """
    from .datalist import load_datalist

    if rank is None or world_size is None:
        r, w = _dist_rank()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    names = [d.strip() for d in datalist.split(",")] if isinstance(datalist, str) else list(datalist)
    if isinstance(split, (list, tuple)):  # the command line (fire) reads training,validation as a tuple
        split = ",".join(str(s) for s in split)
    entries = []
    for name in names:
        es = load_datalist(name, base_dir=base_dir, split=split)
        entries.extend(es[:max_cases] if max_cases else es)
    from ..backbones import IMAGE_SIZE

    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"  # a GPU per process
    cfg = PreprocessConfig(ct_level=ct_level, ct_width=ct_width, mr_lower=mr_lower, mr_upper=mr_upper,
                           size=IMAGE_SIZE[backbone])
    cache = EmbeddingCache(cache_dir, backbone=backbone, preprocess=cfg, checkpoint=checkpoint,
                           orientation=orientation, teacher=teacher, device=device)
    stats = cache.build(entries, slice_step=slice_step, only_labelled_slices=only_labelled_slices,
                        batch_size=batch_size, rank=rank, world_size=world_size, verify=verify, progress=progress,
                        num_views=num_views, all_labelled_slices=all_labelled_slices)
    stats["cases"] = len(entries)
    return stats
