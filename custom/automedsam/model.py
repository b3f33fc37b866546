"""AutoMedSAM: frozen MedSAM image encoder -> diffusion class prompt encoder -> MedSAM mask decoder.

Shaped like segment-anything's ``SamPredictor``: ``encode`` runs the expensive image encoder
once per slice, ``decode`` answers any number of class prompts from that embedding.
"""

from __future__ import annotations

import collections
import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .backbones import LOW_RES_SIZE, SamBackbone, build_backbone, freeze, load_state_dict_file
from . import classes as _vocabulary
from .prompt_encoder import PRESENT_LOGIT, DiffusionClassPromptEncoder, Prompts, class_items


# the logit given to a (slice, class) whose mask decoder was skipped as absent (sigmoid: 0)
ABSENT_LOGIT = -100.0


@dataclass
class Prediction:
    logits: torch.Tensor  # (B,1,256,256) low-res mask logits
    iou: torch.Tensor  # (B,1) the decoder's predicted IoU
    presence_logit: torch.Tensor  # (B,) is the class in this slice at all
    # training a reverse-diffusion prompt encoder on target boxes: its denoising error per item (B,)
    denoise_error: torch.Tensor | None = None

    def probabilities(self) -> torch.Tensor:
        """Per-pixel probability, blanked where the class is predicted absent (presence < 0.5)."""
        present = (self.presence_logit > 0).to(self.logits.dtype).view(-1, 1, 1, 1)
        return torch.sigmoid(self.logits) * present


# A pytree node, so that code walking a forward's output finds its tensors. DistributedDataParallel
# needs this: with static_graph (or find_unused_parameters) it routes the output tensors through
# its autograd hook; an opaque output object hides them and the gradients are never all-reduced.
torch.export.register_dataclass(Prediction)  # public API; registers the same pytree node


# what nn.Module.load_state_dict returns (a (missing_keys, unexpected_keys) named tuple), without its private type
_NO_KEYS_MISSING = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])([], [])

PRESETS = ("ours", "authors")


def build_class_prompt_encoder(num_classes: int | None, backbone: SamBackbone | None = None, preset: str = "ours",
                               **kwargs) -> nn.Module:
    """The class prompt encoder a ``prompt_encoder`` config describes: ``preset: ours`` (default)
    :class:`DiffusionClassPromptEncoder` with the given settings, its dense prompt starting from
    the backbone's "no mask" embedding; ``preset: authors`` the authors' released encoder
    (:mod:`automedsam.prompt_authors`), which takes only ``timesteps``, ``use_diffusion``,
    ``presence`` and ``noise_seed``. ``num_classes`` None: the loaded vocabulary's size."""
    if num_classes is None:
        num_classes = _vocabulary.NUM_CLASSES
    if preset == "authors":
        from .prompt_authors import AuthorsClassPromptEncoder

        return AuthorsClassPromptEncoder(num_classes=num_classes, **kwargs)
    if preset != "ours":
        raise ValueError(f"prompt_encoder preset must be one of {PRESETS}, got '{preset}'")
    if backbone is not None:
        kwargs.setdefault("no_mask_embed", backbone.prompt_encoder.no_mask_embed.weight)
    return DiffusionClassPromptEncoder(num_classes=num_classes, **kwargs)


class AutoMedSAM(nn.Module):
    """Class-prompted MedSAM.

    Args:
        backbone: a :class:`SamBackbone` or a backbone name (``lite_medsam``, ``medsam_vit_b``).
        checkpoint: backbone checkpoint path (None: the packaged LiteMedSAM weights).
        num_classes: size of the class table (ids 1..num_classes); None: the loaded vocabulary's
            (:data:`automedsam.classes.NUM_CLASSES`).
        train_mask_decoder: fine-tune the mask decoder too (the teacher keeps a frozen copy).
        prompt_encoder: the class prompt encoder's settings (:func:`build_class_prompt_encoder`):
            keyword arguments for :class:`DiffusionClassPromptEncoder`, or ``preset: authors``.
        encoder_runtime: how the frozen encoder runs on CPU: ``auto`` (ONNX Runtime when
            installed, else eager), ``eager``, ``onnx`` or ``bf16``; see :mod:`automedsam.runtime`.
            None: ``$AUTOMEDSAM_ENCODER_RUNTIME``, else ``auto``.
        decoder_runtime: how the class decode (class prompt encoder and mask decoder) runs at
            inference on CPU (no gradients, eval mode): ``auto`` (ONNX Runtime when it checks out,
            else eager), ``eager`` or ``onnx``; see :class:`automedsam.runtime.DecoderRunner`.
            None: ``$AUTOMEDSAM_DECODER_RUNTIME``, else ``eager`` (the bundle's inference config
            asks for ``auto``).
    """

    def __init__(self, backbone: SamBackbone | str = "lite_medsam", checkpoint: str | None = None,
                 num_classes: int | None = None, train_mask_decoder: bool = False, prompt_encoder: dict | None = None,
                 encoder_runtime: str | None = None, decoder_runtime: str | None = None):
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, checkpoint)
        backbone.set_encoder_runtime(encoder_runtime or os.environ.get("AUTOMEDSAM_ENCODER_RUNTIME") or "auto")
        self.backbone = backbone
        self.train_mask_decoder = train_mask_decoder
        self.class_prompt_encoder = build_class_prompt_encoder(num_classes, backbone, **(prompt_encoder or {}))
        # classes added later with their own copy of the class-dependent parts (automedsam.class_adapters)
        self.class_heads = nn.ModuleDict()
        # the backbone stays frozen whole: it is also the box-prompted teacher (the original MedSAM
        # path); a fine-tuned decoder is the student's own copy
        freeze(backbone)
        self.student_decoder = copy.deepcopy(backbone.mask_decoder).requires_grad_(True) if train_mask_decoder else None
        self.set_decoder_runtime(decoder_runtime or os.environ.get("AUTOMEDSAM_DECODER_RUNTIME") or "eager")

    def set_decoder_runtime(self, runtime: str) -> None:
        """How the class decode (class prompt encoder and mask decoder) runs at inference on CPU:
        ``auto``, ``eager`` or ``onnx`` (see :class:`automedsam.runtime.DecoderRunner`)."""
        from .runtime import ClassPromptRunner, DecoderRunner

        # plain attributes (not submodules): the runners hold no weights of their own
        object.__setattr__(self, "decoder_runner", DecoderRunner(runtime, f"{self.backbone.name}-mask-decoder"))
        object.__setattr__(self, "prompt_runner", ClassPromptRunner(runtime, f"{self.backbone.name}-class-prompts"))

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen parts stay in eval mode
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (the backbone comes from its package or file)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable(self, path: str | os.PathLike | dict) -> None:
        """Load weights saved by :meth:`trainable_state_dict` (strict over the trainable keys)."""
        state = path if isinstance(path, dict) else load_state_dict_file(path, "AutoMedSAM weights")
        state = self._grown_class_table(state)
        from .class_adapters import heads_from_state

        heads_from_state(self, state)
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - set(self.state_dict())
        if missing or unexpected:
            from .backbones import CheckpointError

            raise CheckpointError(f"AutoMedSAM weights {path if not isinstance(path, dict) else '<dict>'} do not fit "
                                  f"this model: {len(missing)} missing keys (e.g. {sorted(missing)[:2]}), "
                                  f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
        own = self.state_dict()
        wrong = [k for k in sorted(expected) if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            from .backbones import CheckpointError

            k = wrong[0]
            raise CheckpointError(f"AutoMedSAM weights {path if not isinstance(path, dict) else '<dict>'} do not fit "
                                  f"this model: tensor {k} has shape {tuple(state[k].shape)}, the model's is "
                                  f"{tuple(own[k].shape)}" + (f" ({len(wrong) - 1} more tensors differ)"
                                                              if len(wrong) > 1 else ""))
        self.load_state_dict(state, strict=False)

    CLASS_TABLE = "class_prompt_encoder.class_embed.weight"

    def _grown_class_table(self, state: dict) -> dict:
        """Weights whose class table has fewer rows than this model's (saved before classes were
        appended to the vocabulary): their rows kept, the rest from this model's table."""
        rows = state.get(self.CLASS_TABLE)
        own = self.class_prompt_encoder.class_embed.weight
        if rows is None or rows.ndim != 2 or rows.shape[1] != own.shape[1] or rows.shape[0] >= own.shape[0]:
            return state
        state = dict(state)
        state[self.CLASS_TABLE] = torch.cat([rows.to(own.dtype), own.detach()[rows.shape[0]:].cpu()], 0)
        return state

    def grow_classes(self, n: int) -> None:
        """Enlarge the class table to ``n`` classes, existing rows unchanged (see
        :meth:`DiffusionClassPromptEncoder.grow_classes`)."""
        self.class_prompt_encoder.grow_classes(n)

    # ---- the three stages ----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B,256,64,64) from preprocessed images (B,3,S,S) in [0,1]."""
        return self.backbone.encode(images)

    def prompts(self, embeddings: torch.Tensor, class_ids, noise: torch.Tensor | None = None,
                target_boxes: torch.Tensor | None = None) -> Prompts:
        """Class prompts; ``target_boxes`` (B,4), training a reverse-diffusion prompt encoder: the
        ground-truth boxes (backbone-input pixels) whose SAM tokens it learns to denoise to."""
        x0 = None
        if target_boxes is not None and self.class_prompt_encoder.reverse is not None:
            with torch.no_grad():
                x0 = self.backbone.prompt(boxes=target_boxes.float())[0]
        if len(self.class_heads) and x0 is None:  # some class may have its own head
            from . import class_adapters

            return class_adapters.prompts(self, embeddings, class_ids, noise=noise)
        return self.class_prompt_encoder(embeddings, class_ids, noise=noise, x0=x0)

    def decode(self, embeddings: torch.Tensor, class_ids, boxes: torch.Tensor | None = None,
               points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, prompts: Prompts | None = None,
               target_boxes: torch.Tensor | None = None) -> Prediction:
        """Masks for one class per embedding. Optional SAM box (B,4) / point (B,N,2)+(B,N) prompts, in
        backbone-input pixels, are added to the class prompts (interactive correction)."""
        p = prompts if prompts is not None else self.prompts(embeddings, class_ids, noise, target_boxes)
        sparse = p.sparse
        if boxes is not None or points is not None:
            extra, _ = self.backbone.prompt(boxes=boxes, points=points, point_labels=point_labels)
            sparse = torch.cat([sparse, extra.to(sparse.dtype)], 1)
        logits, iou = self._masks(embeddings, sparse, p.dense)
        presence = p.presence_logit
        if boxes is not None or points is not None:
            presence = torch.full_like(presence, PRESENT_LOGIT)  # the user has said the class is there
        return Prediction(logits=logits, iou=iou, presence_logit=presence, denoise_error=p.denoise_error)

    def _masks(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, owner=None, rows=None):
        """MedSAM's mask decoder (the student's copy when it is trained) on prompt embeddings;
        ``owner``/``rows``: see :meth:`SamBackbone.decode`."""
        return self.backbone.decode(embeddings.to(dense.dtype), sparse, dense, mask_decoder=self.student_decoder,
                                    runner=self.decoder_runner, owner=owner, rows=rows)

    def decode_classes(self, embeddings: torch.Tensor, class_ids: Sequence[int], skip_absent: bool = False) -> Prediction:
        """Every class for every embedding: outputs (B*K, ...), class-major within each embedding.

        ``skip_absent``: where a class's presence logit says it is absent (<= 0), its prompt branches
        and mask decoder are not run: its logits are ``ABSENT_LOGIT`` and its predicted IoU 0.
        :meth:`Prediction.probabilities` (and so every label map) is the same either way, since it
        blanks those rows; only the raw logits and IoU of absent rows differ.
        """
        from . import class_adapters

        if class_adapters.head_ids(self) & {int(c) for c in class_ids}:  # a class with its own head is asked
            logits, iou, presence = class_adapters.decode_items(self, embeddings, class_ids, skip_absent,
                                                                ABSENT_LOGIT, LOW_RES_SIZE)
            return Prediction(logits=logits, iou=iou, presence_logit=presence)
        owner, ids = class_items(embeddings.shape[0], class_ids, embeddings.device)
        p = self.prompt_runner(self.class_prompt_encoder, embeddings, owner, ids, skip_absent=skip_absent)
        if not skip_absent:
            logits, iou = self._masks(embeddings, p.sparse, p.dense, owner=owner)
            return Prediction(logits=logits, iou=iou, presence_logit=p.presence_logit)
        # the items decoded: those judged present; p.rows when the prompt encoder skipped the rest
        # itself (eager), else (the ONNX path made prompts for every item) picked here
        present = torch.nonzero(p.presence_logit > 0).squeeze(1)
        n = p.presence_logit.shape[0]
        logits = p.dense.new_full((n, 1, LOW_RES_SIZE, LOW_RES_SIZE), ABSENT_LOGIT)
        iou = p.dense.new_zeros(n, 1)
        if present.numel():
            rows = None if p.rows is not None else present
            logits[present], iou[present] = self._masks(embeddings, p.sparse, p.dense, owner=owner[present], rows=rows)
        return Prediction(logits=logits, iou=iou, presence_logit=p.presence_logit)

    @torch.no_grad()
    def teacher(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The frozen box-prompted MedSAM (the distillation teacher): low-res logits (B,1,256,256)."""
        sparse, dense = self.backbone.prompt(boxes=boxes)
        logits, _ = self.backbone.decode(embeddings.float(), sparse, dense)
        return logits

    def forward(self, images: torch.Tensor | None = None, class_ids=None, embeddings: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                target_boxes: torch.Tensor | None = None) -> Prediction:
        if embeddings is None:
            if images is None:
                raise ValueError("give images or embeddings")
            embeddings = self.encode(images)
        if class_ids is None:
            raise ValueError("class_ids are required: one class id per image")
        return self.decode(embeddings, class_ids, boxes=boxes, points=points, point_labels=point_labels, noise=noise,
                           target_boxes=target_boxes)

    @torch.no_grad()
    def sample(self, embeddings: torch.Tensor, class_ids, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncertainty: N noise draws of the class prompt encoder; mean probability and per-pixel std."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        probs = []
        for _ in range(n):
            noise = torch.randn(embeddings.shape, generator=g).to(embeddings.device)
            probs.append(self.decode(embeddings, class_ids, noise=noise).probabilities())
        stack = torch.stack(probs)
        return stack.mean(0), stack.std(0, unbiased=False)


class LabelMapNet(nn.Module):
    """AutoMedSAM as a tensor-in, tensor-out network for MONAI's bundle tools (``verify_net_in_out``,
    ``ckpt_export`` to TorchScript by tracing): preprocessed images (B,3,S,S) in [0,1] (resized and
    padded, see :mod:`automedsam.data.preprocess`) -> (B,1,256,256) uint8 label map on the mask
    decoder's low-res grid, for a fixed class list (default: every class). Overlaps go to the most
    probable class. ``load_state_dict`` takes what :meth:`AutoMedSAM.trainable_state_dict` saves
    (``models/model.pt``). Inference proper (full resolution, any image size) is the bundle's
    ``inferer``; this view exists for checking and exporting the network.
    """

    def __init__(self, network: AutoMedSAM, class_ids=None, threshold: float = 0.5):
        super().__init__()
        from .classes import parse_classes

        self.network = network
        self.ids = parse_classes(class_ids)
        self.threshold = float(threshold)
        self.register_buffer("label_values", torch.tensor(self.ids, dtype=torch.uint8), persistent=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.network.load_trainable(dict(state_dict))
        return _NO_KEYS_MISSING

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.network.encode(images)
        b, k = emb.shape[0], len(self.ids)
        probs = self.network.decode_classes(emb, self.ids).probabilities().reshape(b, k, LOW_RES_SIZE, LOW_RES_SIZE)
        best, idx = probs.max(1, keepdim=True)
        labels = self.label_values[idx]
        return torch.where(best > self.threshold, labels, torch.zeros_like(labels))
