"""Training samples over the embedding cache: (slice, class) pairs, positive or negative.

For every cached slice and every class its dataset annotates within its modality
(``MODALITY_CLASSES`` of the modality, restricted to the classes in
``DATASET_LABELS[dataset]`` so that an unannotated organ is never taught as absent):

* positive: the class is present in the slice's label (``classes.label_to_classes``);
* negative: it is not (target: an empty mask) - at most ``negative_ratio`` per positive,
  a seeded subsample redrawn by ``set_epoch``;
* cross-domain negative (optional, ``cross_domain_ratio`` per positive): a class of another
  modality asked of this slice (a polyp in a CT slice): always an empty mask;
* hard negative (optional, ``hard_negative_ratio`` per positive): a volume slice within
  ``hard_negative_distance`` slices of one holding the class (the organ's neighbourhood, where
  false positives start); with ratio 0 these are ordinary negatives.

Per epoch (``set_epoch``, deterministic in seed and epoch): the negative subsample is redrawn;
with ``class_balance`` the positives are resampled so that every class is seen about equally
(1: equal counts per class, 0: natural frequencies, between: counts ~ n_c^(1-class_balance)),
the epoch keeping the same number of positives; with ``num_views`` > 1 each slice serves one of
its cached views (0 the plain slice, :mod:`automedsam.data.augment`), drawn per slice per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..classes import CLASS_IDS, DATASET_LABELS, MODALITY_CLASSES
from .augment import views_for
from .cache import CacheError, EmbeddingCache
from .preprocess import LOW_RES

__all__ = ["Sample", "SliceSamples", "dataset_classes"]


@dataclass(frozen=True)
class Sample:
    entry: int  # index into the entries
    slice: int  # slice index in the case
    class_id: int
    positive: bool
    kind: str  # "positive", "negative", "hard_negative" or "cross_domain"
    repeat: int = 0  # a class-balanced repeat within an epoch: it serves the slice's next view


def dataset_classes(dataset: str, modality: str) -> list[int]:
    """Class ids that a dataset's labels answer for (present or truly absent)."""
    labelled = set(DATASET_LABELS[dataset])
    return [CLASS_IDS[n] for n in MODALITY_CLASSES[modality] if n in labelled]


class SliceSamples(torch.utils.data.Dataset):
    """(slice, class) samples of cached slices, served as training dicts.

    Args:
        cache: the :class:`EmbeddingCache` built for ``entries`` (same slice selection).
        entries: datalist entries (``load_datalist``), each with dataset and modality.
        negative_ratio: at most this many in-modality negatives per positive (None: all).
        cross_domain_ratio: this many cross-domain negatives per positive (0: none).
        slice_step, only_labelled_slices: the slice selection (as given to ``build``).
        seed: seeds the negative subsampling (``set_epoch`` redraws it per epoch).
        recompute: compute a missing/corrupt cache entry on the fly (needs the backbone)
            instead of raising :class:`CacheError`.
        cached_only: use only the selected slices that are already in the cache (train on
            what has been built so far; with views: the cached views of those slices).
        num_views: views per slice in the cache (``EmbeddingCache.build(num_views=...)``; an int
            or per dataset).
        class_balance: 0..1, how far the positives are rebalanced towards equal counts per class.
        hard_negative_ratio, hard_negative_distance: near-organ negatives per positive (0: none
            apart from the ordinary negatives) and how near (slices).
        all_labelled_slices: with ``slice_step``, keep every slice holding a class as well.

    Items: ``{"embedding": (256,64,64) float32, "class_id": long, "mask": (1,256,256) float,
    "teacher": (1,256,256) float, "has_teacher": bool, "box": (4,) float, "present": float,
    "case_index": long, "slice_index": long}``; the box is in backbone-input pixels.
    """

    def __init__(self, cache: EmbeddingCache, entries: Sequence[dict], negative_ratio: float | None = 1.0,
                 cross_domain_ratio: float = 0.0, slice_step: int = 1, only_labelled_slices: bool = False,
                 seed: int = 0, recompute: bool = False, cached_only: bool = False, num_views: int = 1,
                 class_balance: float = 0.0, hard_negative_ratio: float = 0.0, hard_negative_distance: int = 3,
                 all_labelled_slices: bool = False):
        if not 0.0 <= float(class_balance) <= 1.0 or float(hard_negative_ratio) < 0 or int(hard_negative_distance) < 1:
            raise ValueError(f"need 0 <= class_balance <= 1, hard_negative_ratio >= 0 and hard_negative_distance >= 1;"
                             f" got {class_balance}, {hard_negative_ratio}, {hard_negative_distance}")
        self.num_views, self.class_balance = num_views, float(class_balance)
        self.hard_negative_ratio = float(hard_negative_ratio)
        self.cache = cache
        self.entries = list(entries)
        self.negative_ratio = negative_ratio
        self.cross_domain_ratio = float(cross_domain_ratio)
        self.seed = int(seed)
        self.recompute = recompute
        self._keys: dict[tuple[int, int, int], str] = {}
        self.positives: list[Sample] = []
        self.negatives: list[Sample] = []
        self.hard_negatives: list[Sample] = []
        self.cross_domain: list[Sample] = []
        self.views: dict[tuple[int, int], list[int]] = {}  # (entry, slice) -> its cached views
        self._view: dict[tuple[int, int], int] = {}  # this epoch's view of each slice
        all_ids = {CLASS_IDS[n] for names in MODALITY_CLASSES.values() for n in names}
        for i, entry in enumerate(self.entries):
            rec = cache.case_record(entry)
            own = dataset_classes(entry["dataset"], entry["modality"])
            own_modality = {CLASS_IDS[n] for n in MODALITY_CLASSES[entry["modality"]]}
            foreign = sorted(all_ids - own_modality)
            near = {cid: set() for cid in own}  # slices near (not on) each class, for hard negatives
            if self.hard_negative_ratio > 0 and rec["num_slices"] > 1:
                d = int(hard_negative_distance)
                for k, present in enumerate(rec["classes"]):
                    for cid in present:
                        if cid in near:
                            near[cid].update(range(max(0, k - d), min(rec["num_slices"], k + d + 1)))
            for k in cache.select_slices(rec, slice_step, only_labelled_slices, all_labelled_slices):
                views = [v for v in range(views_for(num_views, entry["dataset"]))
                         if not cached_only or cache.is_valid(cache.slice_key(entry, k, v), verify=False)]
                if not views or views[0] != 0:  # the plain slice is always there (built first)
                    continue
                self.views[(i, k)] = views
                present = set(rec["classes"][k])
                for cid in own:
                    if cid in present:
                        self.positives.append(Sample(i, k, cid, True, "positive"))
                    elif k in near[cid]:
                        self.hard_negatives.append(Sample(i, k, cid, False, "hard_negative"))
                    else:
                        self.negatives.append(Sample(i, k, cid, False, "negative"))
                for cid in foreign:
                    self.cross_domain.append(Sample(i, k, cid, False, "cross_domain"))
        self.samples: list[Sample] = []
        self.set_epoch(0)

    def _balanced_positives(self, rng: np.random.Generator) -> list[Sample]:
        """The positives resampled towards equal counts per class, same total."""
        by_class: dict[int, list[Sample]] = {}
        for s in self.positives:
            by_class.setdefault(s.class_id, []).append(s)
        if self.class_balance == 0 or len(by_class) < 2:
            return list(self.positives)
        w = {c: len(v) ** (1.0 - self.class_balance) for c, v in by_class.items()}
        total = sum(w.values())
        out = []
        for c in sorted(by_class):
            pool, n = by_class[c], max(1, int(round(len(self.positives) * w[c] / total)))
            reps, rest = divmod(n, len(pool))
            out += [dataclasses.replace(s, repeat=r) for r in range(reps) for s in pool]
            extra = np.sort(rng.choice(len(pool), size=rest, replace=False))
            out += [dataclasses.replace(pool[j], repeat=reps) for j in extra]
        return out

    def set_epoch(self, epoch: int) -> None:
        """Redraw the negative subsample, the class-balanced positives and each slice's view
        (deterministic in seed and epoch)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        positives = self._balanced_positives(np.random.default_rng([self.seed, int(epoch), 2]))
        n_pos = len(positives)

        def pick(pool: list[Sample], ratio: float | None) -> list[Sample]:
            n = len(pool) if ratio is None else min(len(pool), int(np.floor(ratio * n_pos)))
            if n >= len(pool):
                return list(pool)
            idx = np.sort(rng.choice(len(pool), size=n, replace=False))
            return [pool[j] for j in idx]

        self.samples = positives + pick(self.negatives, self.negative_ratio) + \
            pick(self.cross_domain, self.cross_domain_ratio if self.cross_domain_ratio > 0 else 0.0)
        if self.hard_negatives:
            self.samples += pick(self.hard_negatives, self.hard_negative_ratio)
        vrng = np.random.default_rng([self.seed, int(epoch), 1])  # its own stream: today's draws unchanged
        self._view = {sl: (int(v[vrng.integers(len(v))]) if len(v) > 1 else 0) for sl, v in self.views.items()}

    def view_of(self, entry_index: int, slice_index: int, repeat: int = 0) -> int:
        """The view a slice serves this epoch (its ``repeat``-th class-balanced repeat: the next ones)."""
        v = self._view.get((entry_index, slice_index), 0)
        if repeat:
            views = self.views[(entry_index, slice_index)]
            v = views[(views.index(v) + repeat) % len(views)]
        return v

    def counts(self) -> dict[str, int]:
        out = {"positive": 0, "negative": 0, "hard_negative": 0, "cross_domain": 0}
        for s in self.samples:
            out[s.kind] += 1
        return out

    def key(self, entry_index: int, slice_index: int, view: int = 0) -> str:
        k = (entry_index, slice_index, view)
        if k not in self._keys:
            self._keys[k] = self.cache.slice_key(self.entries[entry_index], slice_index, view)
        return self._keys[k]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        entry = self.entries[s.entry]
        view = self.view_of(s.entry, s.slice, s.repeat)
        try:
            d = self.cache.load(self.key(s.entry, s.slice, view))
        except CacheError as e:
            if not self.recompute:
                raise CacheError(f"{e}; build the cache for {entry['image']} first (automedsam cache ...)") from e
            d = self.cache.get(entry, s.slice, view=view)
        mask = torch.zeros(1, LOW_RES, LOW_RES)
        teacher = torch.zeros(1, LOW_RES, LOW_RES)
        box = torch.zeros(4)
        has_teacher = False
        present = 0.0
        if s.positive:
            hits = np.nonzero(d["class_ids"] == s.class_id)[0]
            if hits.size:  # absent only if the mask vanished when resized to the input grid
                j = int(hits[0])
                mask = torch.from_numpy(d["masks"][j].astype(np.float32))[None]
                box = torch.from_numpy(d["boxes"][j].astype(np.float32))
                present = 1.0
                if "teacher" in d and len(d["teacher"]) > j:
                    teacher = torch.from_numpy(d["teacher"][j].astype(np.float32))[None]
                    has_teacher = True
        return {
            "embedding": torch.from_numpy(d["embedding"].astype(np.float32)),
            "class_id": torch.tensor(s.class_id, dtype=torch.long),
            "mask": mask,
            "teacher": teacher,
            "has_teacher": torch.tensor(has_teacher),
            "box": box,
            "present": torch.tensor(present, dtype=torch.float32),
            "case_index": torch.tensor(s.entry, dtype=torch.long),
            "slice_index": torch.tensor(s.slice, dtype=torch.long),
        }
