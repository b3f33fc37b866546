"""Fast paths for the frozen image encoder (and, at inference, the mask decoder).

The image encoder is frozen and is by far the largest cost of inference (LiteMedSAM: ~75 GFLOP
per slice, against a few GFLOP per class decode). It runs once per slice, so its speed is the
speed of the product. The paths:

* ``eager``: PyTorch, fp32 (the reference).
* ``onnx``: the encoder exported once to ONNX and run by ONNX Runtime's CPU provider. On the
  2-core development machine it is about twice as fast as eager with the same result (maximum
  relative difference ~1e-5; see ``benchmarks/speed.py``). The export is keyed by a hash of the
  encoder's weights, its input size and the torch/onnx versions, written atomically to
  ``$AUTOMEDSAM_CACHE_DIR`` (default ``~/.cache/automedsam``), checked against eager on a fixed
  input before it is ever used, and reused by later runs.
* ``bf16``: eager under CPU autocast to bfloat16 (faster on CPUs with AVX512-BF16/AMX, less exact).
* ``auto`` (default): ``onnx`` for CPU tensors when ``onnxruntime`` is installed and the export
  checks out, else ``eager``. CUDA tensors always run eager (the model's own device).

The class decode (the class prompt encoder's per-class part and the mask decoder) runs once per
class and slice, so it sets what each extra class costs. At inference (CPU, no gradients, eval
mode) both parts can run through ONNX Runtime too (``ClassPromptRunner``, ``DecoderRunner``):
dynamic numbers of slices, classes and prompt tokens, each slice's embedding picked inside the
graph rather than copied per class, same answer to ~1e-5; the bundle's inference config turns
this on, training never uses it. Idle ONNX Runtime threads sleep rather than spin, since the
encoder's, the decode's and PyTorch's thread pools take turns on the same cores.

Any failure of the fast path (no onnxruntime, an export the exporter cannot handle, a check that
does not agree) falls back to eager with one warning: the fast path never changes the answer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

RUNTIMES = ("auto", "eager", "onnx", "bf16")
ONNX_OPSET = 17
AGREEMENT_TOL = 1e-3  # max |onnx - eager| / max |eager| on the check input

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where exported encoders live: ``$AUTOMEDSAM_CACHE_DIR`` or ``$XDG_CACHE_HOME/automedsam``."""
    env = os.environ.get("AUTOMEDSAM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "automedsam"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def weights_key(module: nn.Module, image_size: int, signature: str = "") -> str:
    """Hash of the weights, input size, the graph's ``signature`` (its inputs and outputs) and the
    versions that shape an export."""
    import onnx

    h = hashlib.sha256(f"{image_size}|{signature}|{torch.__version__}|{onnx.__version__}|{ONNX_OPSET}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_input(image_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, image_size, image_size, generator=g)


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # idle worker threads sleep instead of spinning: the encoder's, the class decode's and
    # PyTorch's thread pools take turns on the same cores, and a spinning pool steals the next one's
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _OnnxGraph:
    """A frozen module exported once to ONNX (keyed by its weights), checked against eager on
    fixed inputs before first use, and run with ONNX Runtime on CPU.

    Subclasses give ``_inputs`` (check inputs: the first is traced, every one is checked) and
    the export's names and dynamic axes."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    dynamic_axes: dict | None = None

    def __init__(self, module: nn.Module, path: Path, threads: int | None):
        self.module, self.path = module, path
        self.exported = False
        if not self.path.is_file():
            self._export()
            self.exported = True
        try:
            self.session = _session(self.path, threads)
        except Exception as e:  # a damaged file under the right name: make it again, once
            if self.exported:
                raise RuntimeError(f"ONNX Runtime cannot load the fresh export {self.path}: {e}") from e
            logger.warning("re-exporting %s: ONNX Runtime could not load it (%s)", self.path, e)
            self.path.unlink(missing_ok=True)
            self._export()
            self.exported = True
            self.session = _session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def signature(cls) -> str:
        """What the graph takes and gives: part of its file's key, so a changed graph is re-exported."""
        return f"{cls.__name__}({','.join(cls.input_names)})->({','.join(cls.output_names)})"

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    def _export(self) -> None:
        """Export, check against eager on fixed inputs, then rename into place (atomic)."""
        import onnxruntime as ort

        from .atomic import atomic_write

        def export_and_check(tmp: str) -> None:
            inputs = self._inputs()
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.module, inputs[0], tmp, input_names=list(self.input_names),
                                  output_names=list(self.output_names), dynamic_axes=self.dynamic_axes,
                                  opset_version=ONNX_OPSET, dynamo=False)
                refs = [self.module(*x) for x in inputs]
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            for x, ref in zip(inputs, refs):
                ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
                out = sess.run(None, {n: t.numpy() for n, t in zip(self.input_names, x)})
                for o, r in zip(out, ref):
                    err = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-12)) if o.shape == r.shape else np.inf
                    if not err < AGREEMENT_TOL:
                        raise RuntimeError(f"the ONNX export does not agree with eager (relative error {err:.2e}, "
                                           f"shapes {o.shape} vs {r.shape})")

        atomic_write(self.path, export_and_check)


class OnnxEncoder(_OnnxGraph):
    """An image encoder exported to ONNX and run with ONNX Runtime on CPU.

    Args:
        encoder: the (frozen, eval-mode) PyTorch encoder.
        image_size: its input side.
        name: a label for the file name (e.g. the backbone name).
        directory: where to keep exports (default :func:`cache_dir`).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    Raises ``RuntimeError`` when the export cannot be made or does not agree with eager.
    """

    input_names, output_names = ("images",), ("embeddings",)
    # batch 1, static: TinyViT's reshapes trace the batch size as a constant; on CPU a loop over
    # slices costs the same as a batch

    def __init__(self, encoder: nn.Module, image_size: int, name: str = "encoder",
                 directory: str | os.PathLike | None = None, threads: int | None = None):
        self.image_size = image_size
        directory = Path(directory) if directory is not None else cache_dir()
        super().__init__(encoder, directory / f"{name}-{image_size}-{weights_key(encoder, image_size, self.signature())}.onnx", threads)

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        return [(_check_input(self.image_size),)]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(torch.float32).contiguous().numpy()
        out = [self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(out))


def select_masks(embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, owner: torch.Tensor | None,
                 rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask decoder inputs: embedding ``owner[m]`` and prompt ``rows[m]`` for mask m (None: the
    m-th of each)."""
    if owner is not None:
        embeddings = embeddings.index_select(0, owner)
    if rows is not None:
        sparse, dense = sparse.index_select(0, rows), dense.index_select(0, rows)
    return embeddings, sparse, dense


class _SingleMaskDecoder(nn.Module):
    """SAM's mask decoder as a tensors-in, tensors-out graph (one mask per prompt set), picking each
    mask's embedding and prompt inside the graph (no copies outside it)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, embeddings, image_pe, sparse, dense, owner, rows):
        embeddings, sparse, dense = select_masks(embeddings, sparse, dense, owner, rows)
        return self.decoder(image_embeddings=embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                            dense_prompt_embeddings=dense, multimask_output=False)


class OnnxMaskDecoder(_OnnxGraph):
    """A (trained, frozen at inference) SAM mask decoder exported to ONNX: numbers of embeddings,
    prompts, masks and sparse prompt tokens are dynamic; the export is checked at two of each.
    Call with (embeddings (S,C,h,w), image_pe (1,C,h,w), sparse (P,N,C), dense (P,C,h,w), owner
    (M,), rows (M,)) -> (low-res logits (M,1,4h,4w), iou (M,1)); mask m uses embedding
    ``owner[m]`` and prompt ``rows[m]`` (None: the m-th of each)."""

    input_names = ("embeddings", "image_pe", "sparse", "dense", "owner", "rows")
    output_names = ("logits", "iou")
    dynamic_axes = {"embeddings": {0: "slices"}, "sparse": {0: "prompts", 1: "tokens"}, "dense": {0: "prompts"},
                    "owner": {0: "masks"}, "rows": {0: "masks"}, "logits": {0: "masks"}, "iou": {0: "masks"}}

    def __init__(self, decoder: nn.Module, embedding_shape: tuple[int, int, int], name: str = "mask-decoder",
                 directory: str | os.PathLike | None = None, threads: int | None = None):
        self.embedding_shape = tuple(embedding_shape)
        graph = _SingleMaskDecoder(decoder).eval()
        directory = Path(directory) if directory is not None else cache_dir()
        key = weights_key(graph, self.embedding_shape[-1], self.signature())
        super().__init__(graph, directory / f"{name}-{key}.onnx", threads)

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        c, h, w = self.embedding_shape
        pe = torch.randn(1, c, h, w, generator=g)
        out = []
        for s, p, n, owner, rows in ((1, 2, 3, [0, 0], [0, 1]), (2, 4, 5, [0, 1, 1], [0, 2, 3])):
            out.append((torch.randn(s, c, h, w, generator=g), pe, torch.randn(p, n, c, generator=g),
                        torch.randn(p, c, h, w, generator=g), torch.tensor(owner), torch.tensor(rows)))
        return out

    def __call__(self, embeddings, image_pe, sparse, dense, owner=None, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(sparse) if rows is None else len(rows)
        owner = torch.arange(n) if owner is None else owner
        rows = torch.arange(n) if rows is None else rows
        feed = {name: t.detach().to(torch.float32).contiguous().numpy()
                for name, t in zip(self.input_names, (embeddings, image_pe, sparse, dense))}
        feed["owner"], feed["rows"] = owner.to(torch.int64).numpy(), rows.to(torch.int64).numpy()
        logits, iou = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(iou)


def _build_or_fall_back(make, what: str, runtime: str, stacklevel: int):
    """(the ONNX graph ``make()`` builds, None) or (None, why not): ``runtime`` ``onnx`` raises
    instead, ``auto`` warns once and the caller runs eager."""
    graph, failed = None, None
    if not onnxruntime_available():
        failed = "onnxruntime is not installed"
    else:
        try:
            graph = make()
        except Exception as e:  # never let the fast path break inference
            failed = f"{type(e).__name__}: {e}"
    if failed is not None:
        msg = f"ONNX Runtime {what} unavailable ({failed}); using eager PyTorch"
        if runtime == "onnx":
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)
    return graph, failed


class EncoderRunner:
    """Runs a frozen encoder on the chosen path (see the module docstring); builds fast paths lazily,
    on the first CPU call, so a model that goes to the GPU never exports anything."""

    def __init__(self, encoder: nn.Module, image_size: int, name: str, runtime: str = "auto"):
        if runtime not in RUNTIMES:
            raise ValueError(f"encoder runtime must be one of {RUNTIMES}, got '{runtime}'")
        self.encoder, self.image_size, self.name, self.runtime = encoder, image_size, name, runtime
        self._onnx: OnnxEncoder | None = None
        self._failed: str | None = None

    def __getstate__(self):  # copies and pickles rebuild the ONNX session lazily
        return {**self.__dict__, "_onnx": None}

    @property
    def active(self) -> str:
        """The path CPU calls take now (``auto`` resolves on the first call)."""
        if self.runtime in ("eager", "bf16"):
            return self.runtime
        if self._onnx is not None:
            return "onnx"
        if self._failed is not None or (self.runtime == "auto" and not onnxruntime_available()):
            return "eager"
        return "onnx (not built yet)"

    def _onnx_encoder(self) -> OnnxEncoder | None:
        if self._onnx is None and self._failed is None:
            self._onnx, self._failed = _build_or_fall_back(
                lambda: OnnxEncoder(self.encoder, self.image_size, self.name), "encoder", self.runtime, stacklevel=4)
        elif self._onnx is None and self.runtime == "onnx":  # asked for, and failed before: every call says so
            raise RuntimeError(f"ONNX Runtime encoder unavailable ({self._failed})")
        return self._onnx

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # the encoder is frozen (no gradients flow through it), so only the device decides
        if images.device.type == "cpu":
            if self.runtime in ("auto", "onnx"):
                enc = self._onnx_encoder()
                if enc is not None:
                    return enc(images)
            elif self.runtime == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.encoder(images).float()
        return self.encoder(images)


class OnnxClassPrompts(_OnnxGraph):
    """The class prompt encoder's inference path (:meth:`DiffusionClassPromptEncoder.prompts_for`
    with its fixed evaluation noise) exported to ONNX: (embeddings (S,C,h,w), owner (B,), class ids
    (B,)) -> (sparse (B,N,C), dense (B,C,h,w), presence logits (B,)); numbers of slices and items
    are dynamic, checked at two of each. A reverse diffusion's S-step chain is exported unrolled
    for the encoder's current S (part of the file's key: another S is another export)."""

    input_names, output_names = ("embeddings", "owner", "class_ids"), ("sparse", "dense", "presence")
    dynamic_axes = {"embeddings": {0: "slices"}, "owner": {0: "items"}, "class_ids": {0: "items"},
                    "sparse": {0: "items"}, "dense": {0: "items"}, "presence": {0: "items"}}

    def __init__(self, encoder: nn.Module, embedding_shape: tuple[int, int, int], name: str = "class-prompts",
                 directory: str | os.PathLike | None = None, threads: int | None = None):
        self.embedding_shape, self.num_classes = tuple(embedding_shape), encoder.num_classes
        graph = _ClassPromptsGraph(encoder).eval()
        directory = Path(directory) if directory is not None else cache_dir()
        key = weights_key(graph, self.embedding_shape[-1], self.signature() + f"|reverse_steps={reverse_steps(encoder)}")
        super().__init__(graph, directory / f"{name}-{key}.onnx", threads)

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        out = []
        for s, k in ((2, 3), (3, 2)):
            ids = torch.randint(1, self.num_classes + 1, (k,), generator=g)
            out.append((0.1 * torch.randn(s, *self.embedding_shape, generator=g),
                        torch.arange(s).repeat_interleave(k), ids.repeat(s)))
        return out

    def __call__(self, embeddings, owner, class_ids):
        from .prompt_encoder import Prompts

        feed = {"embeddings": embeddings.detach().to(torch.float32).contiguous().numpy(),
                "owner": owner.to(torch.int64).numpy(), "class_ids": class_ids.to(torch.int64).numpy()}
        sparse, dense, presence = (torch.from_numpy(a) for a in self.session.run(None, feed))
        return Prompts(sparse=sparse, dense=dense, presence_logit=presence)


def reverse_steps(encoder: nn.Module) -> int:
    """The S of a class prompt encoder's reverse diffusion (0: one pass); not in its weights."""
    reverse = getattr(encoder, "reverse", None)
    return 0 if reverse is None else int(reverse.steps)


class _ClassPromptsGraph(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, embeddings, owner, class_ids):
        p = self.encoder.prompts_for(embeddings, owner, class_ids)
        return p.sparse, p.dense, p.presence_logit


DECODER_RUNTIMES = ("auto", "eager", "onnx")


class _InferenceGraphRunner:
    """Runs a trainable module for inference through ONNX Runtime (``auto``/``onnx``) or eager.

    ONNX Runtime is used only where it cannot change training: CPU float32 tensors, no gradients
    being recorded, the module in eval mode. The export is keyed by the module's weights and
    rebuilt when they change (parameter and buffer version counters: an optimiser step or a
    ``load_state_dict`` moves them), so a model evaluated between training epochs never meets a
    stale graph. ``auto`` falls back to eager with one warning when the export is unavailable;
    ``onnx`` raises instead. Subclasses say what to build (``_make``) and how to call it.
    """

    what = "module"  # in messages; its file name is ``name`` (default: ``what``, hyphenated)

    def __init__(self, runtime: str = "eager", name: str | None = None):
        if runtime not in DECODER_RUNTIMES:
            raise ValueError(f"decoder runtime must be one of {DECODER_RUNTIMES}, got '{runtime}'")
        self.runtime, self.name = runtime, name or self.what.replace(" ", "-")
        self._onnx = None
        self._stamp = None
        self._failed: str | None = None

    def __getstate__(self):  # copies and pickles rebuild the ONNX session lazily
        return {**self.__dict__, "_onnx": None, "_stamp": None}

    def _make(self, module: nn.Module, shape: tuple[int, int, int]) -> _OnnxGraph:
        raise NotImplementedError

    def _usable(self, module: nn.Module, *tensors: torch.Tensor) -> bool:
        return (self.runtime != "eager" and not torch.is_grad_enabled() and not module.training
                and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))

    def _config(self, module: nn.Module):
        """What shapes the graph besides the weights (part of its stamp)."""
        return None

    def _graph(self, module: nn.Module, shape: tuple[int, int, int]):
        state = list(module.parameters()) + list(module.buffers())
        stamp = (id(module), shape, tuple((t.data_ptr(), t._version) for t in state), self._config(module))
        if stamp != self._stamp:
            self._onnx, self._stamp = None, stamp
            self._onnx, self._failed = _build_or_fall_back(lambda: self._make(module, shape), self.what, self.runtime,
                                                           stacklevel=5)
        elif self._onnx is None and self.runtime == "onnx":  # asked for, and failed before: every call says so
            raise RuntimeError(f"ONNX Runtime {self.what} unavailable ({self._failed})")
        return self._onnx


class DecoderRunner(_InferenceGraphRunner):
    """SAM's mask decoder at inference (see :class:`_InferenceGraphRunner`)."""

    what = "mask decoder"

    def _make(self, module, shape):
        return OnnxMaskDecoder(module, shape, self.name)

    def __call__(self, decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor, owner: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from the decoder; ``owner``/``rows``: see :func:`select_masks`."""
        if self._usable(decoder, embeddings, dense):
            graph = self._graph(decoder, tuple(embeddings.shape[1:]))
            if graph is not None:
                return graph(embeddings, image_pe, sparse, dense, owner, rows)
        embeddings, sparse, dense = select_masks(embeddings, sparse, dense, owner, rows)
        return decoder(image_embeddings=embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=False)


class ClassPromptRunner(_InferenceGraphRunner):
    """The class prompt encoder at inference with its fixed evaluation noise (see
    :class:`_InferenceGraphRunner`); returns :class:`Prompts` for every item (no ``rows``)."""

    what = "class prompt encoder"

    def _config(self, module):
        return reverse_steps(module)

    def _make(self, module, shape):
        return OnnxClassPrompts(module, shape, self.name)

    def __call__(self, encoder: nn.Module, embeddings: torch.Tensor, owner: torch.Tensor, class_ids: torch.Tensor,
                 skip_absent: bool = False):
        encoder.check_class_ids(class_ids)
        if self._usable(encoder, embeddings):
            graph = self._graph(encoder, tuple(embeddings.shape[1:]))
            if graph is not None:
                return graph(embeddings, owner, class_ids)
        return encoder.prompts_for(embeddings, owner, class_ids, skip_absent=skip_absent)
