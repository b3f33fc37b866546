"""Class heads: a class added later (:func:`automedsam.adapt.add_class`) gets its own copy of the
class prompt encoder's class-dependent parts, used for its id only.

One 64-number row of the class table steering a frozen prompt network has too little capacity for
a class unlike the ones the network was trained on (a fetal head in ultrasound). A class head is a
copy of what comes after the class-independent trunk (the class map, the step embedding, the
bottleneck, its FiLM, both branches, the token pooling and the presence head; ~0.7 M numbers),
trained for the new class alone. The trunk, the mask decoder and every old class's weights are
shared and untouched, so an old class's answer is computed by exactly the code and weights it was
before (bit-identical); items asking for a class with a head are routed through its copy.

Stored in ``model.pt`` under ``class_heads.<id>.*``; :meth:`AutoMedSAM.load_trainable` creates
the heads a weights file holds before loading it (a file without any loads as before).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .prompt_encoder import Prompts, class_items

__all__ = ["HEAD_PARTS", "make_head", "heads_from_state", "head_ids", "encoder_for", "prompts", "decode_items"]

PREFIX = "class_heads."
# the class prompt encoder's class-dependent parts (after the shared trunk)
HEAD_PARTS = ("class_map", "time_embed", "mid", "film", "dense_branch", "sparse_branch", "token_pool",
              "presence_head")


def make_head(encoder: nn.Module) -> nn.ModuleDict:
    """A trainable copy of ``encoder``'s class-dependent parts."""
    if getattr(encoder, "layout", None) != "shared_trunk" or getattr(encoder, "reverse", None) is not None:
        raise ValueError("class heads need the 'ours' class prompt encoder with layout shared_trunk and the "
                         "one-pass sparse prompt")
    return nn.ModuleDict({k: copy.deepcopy(getattr(encoder, k)) for k in HEAD_PARTS
                          if getattr(encoder, k, None) is not None})


def heads_from_state(model: nn.Module, state: dict) -> None:
    """Create (as copies of the encoder's parts, to be overwritten by the load) the heads ``state`` holds."""
    ids = sorted({k[len(PREFIX):].split(".", 1)[0] for k in state if k.startswith(PREFIX)}, key=int)
    for i in ids:
        if i not in model.class_heads:
            model.class_heads[i] = make_head(model.class_prompt_encoder)


def head_ids(model: nn.Module) -> set[int]:
    heads = getattr(model, "class_heads", None)
    return {int(k) for k in heads} if heads else set()


def encoder_for(encoder: nn.Module, head: nn.ModuleDict) -> nn.Module:
    """``encoder`` with its class-dependent parts replaced by ``head``'s (a shallow view: the trunk,
    the class table and the buffers are the encoder's own)."""
    view = copy.copy(encoder)
    view.__dict__["_modules"] = {**encoder._modules, **head._modules}
    return view


def _cat(parts: list[tuple[torch.Tensor, Prompts]], n: int) -> Prompts:
    """Per-group prompts (every item of each group, ``rows`` None) scattered back into item order."""
    first = parts[0][1]
    sparse = first.sparse.new_zeros(n, *first.sparse.shape[1:])
    dense = first.dense.new_zeros(n, *first.dense.shape[1:])
    presence = first.presence_logit.new_zeros(n)
    for idx, p in parts:
        sparse, dense, presence = sparse.index_copy(0, idx, p.sparse), dense.index_copy(0, idx, p.dense), \
            presence.index_copy(0, idx, p.presence_logit)
    return Prompts(sparse=sparse, dense=dense, presence_logit=presence)


def _groups(model, ids: torch.Tensor):
    """(item indices, encoder) per group: old classes with the shared encoder, each headed class with its own."""
    enc = model.class_prompt_encoder
    out = []
    headed = torch.zeros_like(ids, dtype=torch.bool)
    for k in sorted(head_ids(model)):
        sel = ids == k
        if sel.any():
            headed |= sel
            out.append((torch.nonzero(sel).squeeze(1), encoder_for(enc, model.class_heads[str(k)])))
    if (~headed).any():
        out.insert(0, (torch.nonzero(~headed).squeeze(1), enc))
    return out


def prompts(model, embeddings: torch.Tensor, class_ids, noise: torch.Tensor | None = None) -> Prompts:
    """One class per embedding, each item through its class's encoder (the model's ``prompts``)."""
    ids = torch.as_tensor(class_ids, device=embeddings.device).long().reshape(-1)
    groups = _groups(model, ids)
    if len(groups) == 1:
        return groups[0][1](embeddings, ids, noise=noise)
    parts = [(idx, enc(embeddings[idx], ids[idx], noise=None if noise is None else noise[idx])) for idx, enc in groups]
    return _cat(parts, ids.numel())


def decode_items(model, embeddings: torch.Tensor, class_ids, skip_absent: bool, absent_logit: float, low_res: int):
    """:meth:`AutoMedSAM.decode_classes` when some asked class has a head: (logits, iou, presence),
    each group's prompts by its encoder (eager), the shared mask decoder for the items decoded."""
    owner, ids = class_items(embeddings.shape[0], class_ids, embeddings.device)
    parts = [(idx, enc.prompts_for(embeddings, owner[idx], ids[idx])) for idx, enc in _groups(model, ids)]
    p = _cat(parts, ids.numel())
    n = ids.numel()
    keep = torch.nonzero(p.presence_logit > 0).squeeze(1) if skip_absent else torch.arange(n, device=ids.device)
    logits = p.dense.new_full((n, 1, low_res, low_res), absent_logit)
    iou = p.dense.new_zeros(n, 1)
    if keep.numel():
        logits[keep], iou[keep] = model._masks(embeddings, p.sparse[keep], p.dense[keep], owner=owner[keep])
    return logits, iou, p.presence_logit
