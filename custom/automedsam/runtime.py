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

The mask decoder runs once per class and slice, so it sets what each extra class costs. At
inference (``DecoderRunner``: CPU, no gradients, eval mode) it can run through ONNX Runtime too,
with dynamic batch and prompt-token count (about 2.5x eager on 2 cores, same logits to ~1e-5);
the bundle's inference config turns this on, training never uses it.

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


def weights_key(module: nn.Module, image_size: int) -> str:
    """Hash of the weights, input size and the versions that shape an export."""
    import onnx

    h = hashlib.sha256(f"{image_size}|{torch.__version__}|{onnx.__version__}|{ONNX_OPSET}".encode())
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
        super().__init__(encoder, directory / f"{name}-{image_size}-{weights_key(encoder, image_size)}.onnx", threads)

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        return [(_check_input(self.image_size),)]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(torch.float32).contiguous().numpy()
        out = [self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(out))


class _SingleMaskDecoder(nn.Module):
    """SAM's mask decoder as a tensors-in, tensors-out graph (one mask per prompt set)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, embeddings, image_pe, sparse, dense):
        return self.decoder(image_embeddings=embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                            dense_prompt_embeddings=dense, multimask_output=False)


class OnnxMaskDecoder(_OnnxGraph):
    """A (trained, frozen at inference) SAM mask decoder exported to ONNX: batch and number of
    sparse prompt tokens are dynamic; the export is checked at two batch sizes and token counts.
    Call with (embeddings (B,C,h,w), image_pe (1,C,h,w), sparse (B,N,C), dense (B,C,h,w)) ->
    (low-res logits (B,1,4h,4w), iou (B,1))."""

    input_names, output_names = ("embeddings", "image_pe", "sparse", "dense"), ("logits", "iou")
    dynamic_axes = {"embeddings": {0: "batch"}, "sparse": {0: "batch", 1: "tokens"}, "dense": {0: "batch"},
                    "logits": {0: "batch"}, "iou": {0: "batch"}}

    def __init__(self, decoder: nn.Module, embedding_shape: tuple[int, int, int], name: str = "mask-decoder",
                 directory: str | os.PathLike | None = None, threads: int | None = None):
        self.embedding_shape = tuple(embedding_shape)
        graph = _SingleMaskDecoder(decoder).eval()
        directory = Path(directory) if directory is not None else cache_dir()
        key = weights_key(graph, self.embedding_shape[-1])
        super().__init__(graph, directory / f"{name}-{key}.onnx", threads)

    def _inputs(self) -> list[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(0)
        c, h, w = self.embedding_shape
        pe = torch.randn(1, c, h, w, generator=g)
        return [(torch.randn(b, c, h, w, generator=g), pe, torch.randn(b, n, c, generator=g),
                 torch.randn(b, c, h, w, generator=g)) for b, n in ((2, 3), (3, 5))]

    def __call__(self, embeddings, image_pe, sparse, dense) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {n: t.detach().to(torch.float32).contiguous().numpy()
                for n, t in zip(self.input_names, (embeddings, image_pe, sparse, dense))}
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


DECODER_RUNTIMES = ("auto", "eager", "onnx")


class DecoderRunner:
    """Runs a mask decoder for inference through ONNX Runtime (``auto``/``onnx``) or eager.

    ONNX Runtime is used only where it cannot change training: CPU float32 tensors, no gradients
    being recorded, the decoder in eval mode. The export is keyed by the decoder's weights and
    rebuilt when they change (parameter version counters: an optimiser step or a
    ``load_state_dict`` moves them), so a model evaluated between training epochs never meets a
    stale graph. ``auto`` falls back to eager with one warning when the export is unavailable;
    ``onnx`` raises instead.
    """

    def __init__(self, runtime: str = "eager", name: str = "mask-decoder"):
        if runtime not in DECODER_RUNTIMES:
            raise ValueError(f"decoder runtime must be one of {DECODER_RUNTIMES}, got '{runtime}'")
        self.runtime, self.name = runtime, name
        self._onnx: OnnxMaskDecoder | None = None
        self._stamp = None
        self._failed: str | None = None

    def __getstate__(self):  # copies and pickles rebuild the ONNX session lazily
        return {**self.__dict__, "_onnx": None, "_stamp": None}

    def _graph(self, decoder: nn.Module, shape: tuple[int, int, int]) -> OnnxMaskDecoder | None:
        params = list(decoder.parameters())
        stamp = (id(decoder), shape, tuple((p.data_ptr(), p._version) for p in params))
        if stamp != self._stamp:
            self._onnx, self._stamp = None, stamp
            self._onnx, self._failed = _build_or_fall_back(
                lambda: OnnxMaskDecoder(decoder, shape, self.name), "mask decoder", self.runtime, stacklevel=5)
        elif self._onnx is None and self.runtime == "onnx":  # asked for, and failed before: every call says so
            raise RuntimeError(f"ONNX Runtime mask decoder unavailable ({self._failed})")
        return self._onnx

    def __call__(self, decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.runtime != "eager" and embeddings.device.type == "cpu" and embeddings.dtype == torch.float32
                and dense.dtype == torch.float32 and not torch.is_grad_enabled() and not decoder.training):
            graph = self._graph(decoder, tuple(embeddings.shape[1:]))
            if graph is not None:
                return graph(embeddings, image_pe, sparse, dense)
        return decoder(image_embeddings=embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                       dense_prompt_embeddings=dense, multimask_output=False)
