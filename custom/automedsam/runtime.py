"""Fast paths for the frozen image encoder.

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


class OnnxEncoder:
    """An image encoder exported to ONNX and run with ONNX Runtime on CPU.

    Args:
        encoder: the (frozen, eval-mode) PyTorch encoder.
        image_size: its input side.
        name: a label for the file name (e.g. the backbone name).
        directory: where to keep exports (default :func:`cache_dir`).
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``).
    Raises ``RuntimeError`` when the export cannot be made or does not agree with eager.
    """

    def __init__(self, encoder: nn.Module, image_size: int, name: str = "encoder",
                 directory: str | os.PathLike | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory) if directory is not None else cache_dir()
        self.path = self.directory / f"{name}-{image_size}-{weights_key(encoder, image_size)}.onnx"
        self.exported = False
        if not self.path.is_file():
            self._export(encoder, image_size)
            self.exported = True
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a damaged file under the right name: make it again, once
            if self.exported:
                raise RuntimeError(f"ONNX Runtime cannot load the fresh export {self.path}: {e}") from e
            logger.warning("re-exporting %s: ONNX Runtime could not load it (%s)", self.path, e)
            self.path.unlink(missing_ok=True)
            self._export(encoder, image_size)
            self.exported = True
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _export(self, encoder: nn.Module, image_size: int) -> None:
        """Export, check against eager on a fixed input, then rename into place (atomic)."""
        import onnxruntime as ort

        from .atomic import atomic_write

        def export_and_check(tmp: str) -> None:
            x = _check_input(image_size)
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # batch 1, static: TinyViT's reshapes trace the batch size as a constant; on CPU a
                # loop over slices costs the same as a batch
                torch.onnx.export(encoder, (x,), tmp, input_names=["images"], output_names=["embeddings"],
                                  opset_version=ONNX_OPSET, dynamo=False)
                ref = encoder(x).numpy()
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
            if out.shape != ref.shape or not err < AGREEMENT_TOL:
                raise RuntimeError(f"the ONNX export does not agree with eager (relative error {err:.2e}, "
                                   f"shapes {out.shape} vs {ref.shape})")

        atomic_write(self.path, export_and_check)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(torch.float32).contiguous().numpy()
        out = [self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))]
        return torch.from_numpy(np.concatenate(out))


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
            if not onnxruntime_available():
                self._failed = "onnxruntime is not installed"
            else:
                try:
                    self._onnx = OnnxEncoder(self.encoder, self.image_size, self.name)
                except Exception as e:  # never let the fast path break inference
                    self._failed = f"{type(e).__name__}: {e}"
            if self._failed is not None:
                msg = f"ONNX Runtime encoder unavailable ({self._failed}); using eager PyTorch"
                if self.runtime == "onnx":
                    raise RuntimeError(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
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
