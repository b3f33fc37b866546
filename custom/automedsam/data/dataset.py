"""Training samples over the embedding cache: (slice, class) pairs, positive or negative.

For every cached slice and every class its dataset annotates within its modality
(``MODALITY_CLASSES`` of the modality, restricted to the classes in
``DATASET_LABELS[dataset]`` so that an unannotated organ is never taught as absent):

* positive: the class is present in the slice's label (``classes.label_to_classes``);
* negative: it is not (target: an empty mask) - at most ``negative_ratio`` per positive,
  a seeded subsample redrawn by ``set_epoch``;
* cross-domain negative (optional, ``cross_domain_ratio`` per positive): a class of another
  modality asked of this slice (a polyp in a CT slice): always an empty mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..classes import CLASS_IDS, DATASET_LABELS, MODALITY_CLASSES
from .cache import CacheError, EmbeddingCache
from .preprocess import LOW_RES

__all__ = ["Sample", "SliceSamples", "dataset_classes"]


@dataclass(frozen=True)
class Sample:
    entry: int  # index into the entries
    slice: int  # slice index in the case
    class_id: int
    positive: bool
    kind: str  # "positive", "negative" or "cross_domain"


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
            what has been built so far).

    Items: ``{"embedding": (256,64,64) float32, "class_id": long, "mask": (1,256,256) float,
    "teacher": (1,256,256) float, "has_teacher": bool, "box": (4,) float, "present": float,
    "case_index": long, "slice_index": long}``; the box is in backbone-input pixels.
    """

    def __init__(self, cache: EmbeddingCache, entries: Sequence[dict], negative_ratio: float | None = 1.0,
                 cross_domain_ratio: float = 0.0, slice_step: int = 1, only_labelled_slices: bool = False,
                 seed: int = 0, recompute: bool = False, cached_only: bool = False):
        self.cache = cache
        self.entries = list(entries)
        self.negative_ratio = negative_ratio
        self.cross_domain_ratio = float(cross_domain_ratio)
        self.seed = int(seed)
        self.recompute = recompute
        self._keys: dict[tuple[int, int], str] = {}
        self.positives: list[Sample] = []
        self.negatives: list[Sample] = []
        self.cross_domain: list[Sample] = []
        all_ids = {CLASS_IDS[n] for names in MODALITY_CLASSES.values() for n in names}
        for i, entry in enumerate(self.entries):
            rec = cache.case_record(entry)
            own = dataset_classes(entry["dataset"], entry["modality"])
            own_modality = {CLASS_IDS[n] for n in MODALITY_CLASSES[entry["modality"]]}
            foreign = sorted(all_ids - own_modality)
            for k in cache.select_slices(rec, slice_step, only_labelled_slices):
                if cached_only and not cache.is_valid(cache.slice_key(entry, k), verify=False):
                    continue
                present = set(rec["classes"][k])
                for cid in own:
                    if cid in present:
                        self.positives.append(Sample(i, k, cid, True, "positive"))
                    else:
                        self.negatives.append(Sample(i, k, cid, False, "negative"))
                for cid in foreign:
                    self.cross_domain.append(Sample(i, k, cid, False, "cross_domain"))
        self.samples: list[Sample] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the negative subsample (deterministic in seed and epoch)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        n_pos = len(self.positives)

        def pick(pool: list[Sample], ratio: float | None) -> list[Sample]:
            n = len(pool) if ratio is None else min(len(pool), int(np.floor(ratio * n_pos)))
            if n >= len(pool):
                return list(pool)
            idx = np.sort(rng.choice(len(pool), size=n, replace=False))
            return [pool[j] for j in idx]

        self.samples = self.positives + pick(self.negatives, self.negative_ratio) + \
            pick(self.cross_domain, self.cross_domain_ratio if self.cross_domain_ratio > 0 else 0.0)

    def counts(self) -> dict[str, int]:
        out = {"positive": 0, "negative": 0, "cross_domain": 0}
        for s in self.samples:
            out[s.kind] += 1
        return out

    def key(self, entry_index: int, slice_index: int) -> str:
        k = (entry_index, slice_index)
        if k not in self._keys:
            self._keys[k] = self.cache.slice_key(self.entries[entry_index], slice_index)
        return self._keys[k]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        entry = self.entries[s.entry]
        try:
            d = self.cache.load(self.key(s.entry, s.slice))
        except CacheError as e:
            if not self.recompute:
                raise CacheError(f"{e}; build the cache for {entry['image']} first (automedsam cache ...)") from e
            d = self.cache.get(entry, s.slice)
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
