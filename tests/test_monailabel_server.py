"""A real MONAI Label server (``monailabel start_server``) with the app in apps/monailabel, on
127.0.0.1, answering ``/info/`` and ``/infer/automedsam`` over HTTP for a real CT volume and real
Kvasir polyp images.

MONAI Label lives in a virtual environment of its own (``.venv-monailabel`` in the repository
root, or ``$AUTOMEDSAM_MONAILABEL_VENV``), made once and reused while its key (a hash of
apps/monailabel/requirements.txt, the Python version and the parent environment)
is unchanged. It has to be separate: MONAI Label 0.8.5 needs pydicom < 3 (pydicom-seg) and
numpy < 2 (pydicom-seg, numpymaxflow), while the project's environment has pydicom 3 (highdicom)
and numpy 2. To save 5 GB of torch per checkout it is layered on the environment running the
tests, as ``--system-site-packages`` would layer it on a system Python: a ``.pth`` file appends the
parent's site-packages *after* its own, so what the server environment installs itself (pydicom
2.4.4, numpy 1.26.4, MONAI Label and its dependencies) shadows the parent's, and pip resolves the
whole pinned requirements file against both (torch, monai, ... are found in the parent, the
versions pinned there). Packages only in the parent and outside that closure (highdicom, onnx's
ml-dtypes) are not imported by the server. The deployable, standalone recipe is in
bundles/automedsam/docs/README.md ("MONAI Label, 3D Slicer and OHIF").

CPU budget (2 cores, no GPU; the LiteMedSAM encoder costs 1-2 s per slice, more on a loaded
machine): the CT is a 4-slice crop (slices 15-18, liver, spleen, both kidneys and pancreas in each)
of the real TotalSegmentator CT, written with nibabel (the crop's affine is the original's with the
origin moved to the first kept slice); the 2D inputs are the real 256x256 Kvasir JPG and a
non-square PNG crop of it. The first venv build downloads MONAI Label's dependencies from PyPI
(about 2-4 minutes); the server preloads the network (``--conf preload true``).
"""

from __future__ import annotations

import email.parser
import email.policy
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel"
REQUIREMENTS = APP / "requirements.txt"
METADATA = REPO / "bundles" / "automedsam" / "configs" / "metadata.json"
VENV = Path(os.environ.get("AUTOMEDSAM_MONAILABEL_VENV", REPO / ".venv-monailabel"))
MODEL = "automedsam"

CT = "abdomen-ct/totalseg-example/ct.nii.gz"
CT_LABEL = "abdomen-ct/totalseg-example/label.nii.gz"
CT_SLICES = (15, 19)  # 4 slices with liver, spleen, both kidneys and pancreas
TOTALSEG_LIVER = 5
POLYP = "polyp/kvasir-seg/images/cju0qkwl35piu0993l0dewei2.jpg"
POLYP_MASK = "polyp/kvasir-seg/masks/cju0qkwl35piu0993l0dewei2.jpg"

SETUPTOOLS = "setuptools==84.2.1"  # >= 77 (torch 2.14), present before the --no-build-isolation builds
VENV_BUILD_TIMEOUT = 1800
SERVER_START_TIMEOUT = 600
INFER_TIMEOUT = 900

# ------------------------------------------------------------------------------------ the venv


def _parent_site_dirs() -> list[str]:
    dirs = []
    for key in ("purelib", "platlib"):
        d = sysconfig.get_paths()[key]
        if d not in dirs and os.path.isdir(d):
            dirs.append(d)
    return dirs


def _venv_key() -> str:
    h = hashlib.sha256()
    h.update(REQUIREMENTS.read_bytes())
    h.update(f"{sys.version}|{sys.prefix}|{_parent_site_dirs()}|{SETUPTOOLS}|layered-v2".encode())
    return h.hexdigest()


def _run(cmd: list, log: Path, env: dict, timeout: int) -> None:
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{cmd[:4]} failed with exit status {proc.returncode}; log {log}:\n{tail}")


def _build_venv(key: str) -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    log = VENV.parent / f"{VENV.name}-build.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "SAM2_BUILD_CUDA": "0"})  # sam2: an sdist, CPU build
    _run([sys.executable, "-m", "venv", VENV], log, env, 300)
    py = VENV / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # layered on the running environment; its own site-packages stays first on sys.path
    lines = [f"import site; site.addsitedir({d!r})" for d in _parent_site_dirs()]
    (Path(site) / "_automedsam_parent_env.pth").write_text("\n".join(lines) + "\n")
    # torch first (found in the parent, normally: nothing to do): sam2, an sdist, builds against it
    torch_pins = [line.strip() for line in REQUIREMENTS.read_text().splitlines()
                  if line.strip().startswith(("torch==", "torchvision=="))]
    _run([py, "-m", "pip", "install", "--quiet", SETUPTOOLS, *torch_pins], log, env, VENV_BUILD_TIMEOUT)
    # sdists are built against this environment (its torch), not an isolated one (a second torch)
    _run([py, "-m", "pip", "install", "--no-build-isolation", "-r", REQUIREMENTS], log, env, VENV_BUILD_TIMEOUT)
    _run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", REPO], log, env, 600)
    smoke = ("import numpy, pydicom, torch, monai, monailabel, automedsam.inferer, automedsam.transforms;"
             "from monailabel.tasks.infer.bundle import BundleInferTask;"
             "assert pydicom.__version__.startswith('2.'), pydicom.__version__;"
             "assert str(numpy.__file__).startswith(%r), numpy.__file__;"
             "print('numpy', numpy.__version__, 'pydicom', pydicom.__version__, 'torch', torch.__version__,"
             " 'monai', monai.__version__, 'monailabel', monailabel.__version__)") % str(VENV)
    _run([py, "-c", smoke], log, env, 300)
    (VENV / ".automedsam-key").write_text(key)


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    """The MONAI Label environment, built on first use and reused while its key is unchanged."""
    key = _venv_key()
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / f"{VENV.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        marker = VENV / ".automedsam-key"
        if not (marker.is_file() and marker.read_text() == key and (VENV / "bin" / "monailabel").is_file()):
            t0 = time.monotonic()
            _build_venv(key)
            print(f"\nbuilt {VENV} in {time.monotonic() - t0:.0f} s")
    return VENV


# ------------------------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if pytest itself is killed (no finalizer runs then)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def studies(data_root, tmp_path_factory) -> dict:
    """MONAI Label's local datastore: the CT crop, the real polyp JPG, a non-square PNG crop of it."""
    d = tmp_path_factory.mktemp("studies")
    z0, z1 = CT_SLICES
    nib.save(nib.load(str(data_root / CT)).slicer[:, :, z0:z1], str(d / "ct.nii.gz"))
    shutil.copyfile(data_root / POLYP, d / "polyp.jpg")
    rgb = np.asarray(Image.open(data_root / POLYP).convert("RGB"))
    Image.fromarray(rgb[:240, 20:220]).save(d / "polypcrop.png")  # 240 rows x 200 columns
    return {"dir": d, "ct": d / "ct.nii.gz", "polyp": d / "polyp.jpg", "polypcrop": d / "polypcrop.png"}


@pytest.fixture(scope="module")
def server(studies, monailabel_venv, tmp_path_factory, request) -> dict:  # data first: skip before any build
    """``monailabel start_server`` in its own process group; killed (the whole group) at the end."""
    port = _free_port()
    logs = tmp_path_factory.mktemp("monailabel-logs")
    log_file = logs / "server.log"
    bin_dir = monailabel_venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(monailabel_venv),
        "MONAILABEL_PYEXE": str(bin_dir / "python"),  # the `monailabel` script runs this python
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
        "MONAI_LABEL_SESSION_PATH": str(logs / "sessions"),
        "PYTHONUNBUFFERED": "1",
    })
    cmd = [str(bin_dir / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies["dir"]),
           "--conf", "models", MODEL, "--conf", "preload", "true", "--host", "127.0.0.1", "--port", str(port)]
    fh = open(log_file, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(logs),
                            start_new_session=True,  # its own process group: killed as a whole
                            preexec_fn=_die_with_parent)

    def stop():
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # whatever is left of the group (the script exec's python, so usually nothing)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        fh.close()

    request.addfinalizer(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{_tail(log_file)}")
        try:
            status, body = _get(f"{base}/info/", timeout=10)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"no answer from {base}/info/ after {SERVER_START_TIMEOUT} s:\n{_tail(log_file)}")
        time.sleep(2)
    startup = time.monotonic() - t0
    print(f"\nMONAI Label server up in {startup:.0f} s (network preloaded) at {base}")
    return {"base": base, "info": json.loads(body), "log": log_file, "proc": proc, "startup_s": startup}


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else "(no log)"


def infer(server: dict, image_id: str, params: dict, out_dir: Path) -> tuple[dict, Path, float]:
    """POST /infer/<model>?image=<id>&output=all -> (result params, the label file, wall seconds)."""
    query = urllib.parse.urlencode({"image": image_id, "output": "all"})
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    req = urllib.request.Request(f"{server['base']}/infer/{MODEL}?{query}", data=body, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=INFER_TIMEOUT) as r:
            content_type, raw = r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{MODEL} for {image_id}: HTTP {e.code} {e.read()[:500]!r}\n{_tail(server['log'])}")
    wall = time.monotonic() - t0
    assert content_type.startswith("multipart/form-data"), content_type
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    assert set(parts) == {"params", "image"}, set(parts)
    result = json.loads(parts["params"].get_payload(decode=True))
    label = out_dir / parts["image"].get_filename()
    label.write_bytes(parts["image"].get_payload(decode=True))
    return result, label, wall


# ------------------------------------------------------------------------------------ tests


def channel_def() -> dict[str, int]:
    pred = json.loads(METADATA.read_text())["network_data_format"]["outputs"]["pred"]
    return {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}


def test_info_lists_the_bundle_with_its_labels_and_options(server):
    info = server["info"]
    assert MODEL in info["models"], list(info["models"])
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["labels"] == channel_def()
    assert {"class_names", "modality"} <= set(model["config"])  # displayable_configs, shown by the clients
    assert model["config"]["class_names"] == "" and model["config"]["modality"] == ""
    assert info["trainers"] == {}
    assert (APP / "model" / MODEL).resolve() == (REPO / "bundles" / "automedsam").resolve()


def test_infer_ct_volume_all_classes(server, studies, data_root, tmp_path):
    """Every CT class (the default): a uint8 label map on the input's grid and affine, liver found
    where the reference label has it."""
    result, label, wall = infer(server, "ct", {}, tmp_path)
    print(f"\nCT {CT_SLICES[1] - CT_SLICES[0]}-slice crop: server infer {result['latencies']['total']} s "
          f"(inferer {result['latencies']['infer']} s), HTTP round trip {wall:.1f} s")
    assert label.name.endswith(".nii.gz"), label.name
    src, out = nib.load(str(studies["ct"])), nib.load(str(label))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-3)
    assert out.get_data_dtype() == np.uint8
    labels = np.asarray(out.dataobj)
    names = channel_def()
    assert result["label_names"] == names
    ids = set(np.unique(labels).tolist())
    assert ids <= {0, *names.values()}, ids
    liver = labels == names["liver"]
    assert liver.sum() > 100, f"liver: {int(liver.sum())} voxels"
    assert result["found_labels"] == {n: i for n, i in names.items() if i in ids}
    assert ids - {0} <= {names[c] for c in ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")}
    z0, z1 = CT_SLICES
    ref = np.asarray(nib.load(str(data_root / CT_LABEL)).dataobj)[:, :, z0:z1] == TOTALSEG_LIVER
    dice = 2 * (liver & ref).sum() / (liver.sum() + ref.sum())
    print(f"liver Dice {dice:.3f} against the TotalSegmentator label")
    assert dice > 0.6, f"liver Dice {dice:.3f} against the (model-made) reference: wrong orientation?"


def test_infer_2d_jpg_all_classes(server, studies, data_root, tmp_path):
    """A real Kvasir JPG: a lossless PNG label map of the image's size, the polyp where the expert
    mask has it."""
    result, label, wall = infer(server, "polyp", {}, tmp_path)
    print(f"\npolyp JPG 256x256: server infer {result['latencies']['total']} s, HTTP round trip {wall:.1f} s")
    assert label.name.endswith(".png"), label.name
    img = Image.open(label)
    assert img.mode == "L" and img.size == Image.open(studies["polyp"]).size
    labels = np.asarray(img)
    names = channel_def()
    assert result["label_names"] == names
    assert set(np.unique(labels).tolist()) <= {0, *names.values()}
    polyp = labels == names["polyp"]
    mask = np.asarray(Image.open(data_root / POLYP_MASK).convert("L")) > 127
    dice = 2 * (polyp & mask).sum() / (polyp.sum() + mask.sum())
    print(f"polyp Dice {dice:.3f} against the expert mask")
    assert dice > 0.7, f"polyp Dice {dice:.3f} against the expert mask"
    assert result["found_labels"] == {"polyp": names["polyp"]}


def test_infer_2d_png_classes_chosen_by_the_request(server, studies, tmp_path):
    """A non-square PNG (240 rows x 200 columns): the label map keeps rows and columns; the request's
    ``classes`` replaces the default class list (polyp, found by default, is not asked)."""
    found, label, _ = infer(server, "polypcrop", {"classes": "polyp"}, tmp_path)
    labels = np.asarray(Image.open(label))
    assert labels.shape == (240, 200)
    assert set(np.unique(labels).tolist()) == {0, channel_def()["polyp"]}
    assert found["found_labels"] == {"polyp": channel_def()["polyp"]}

    result, label, wall = infer(server, "polypcrop", {"class_names": "liver,lungs"}, tmp_path)
    print(f"\npolyp PNG 240x200, 2 classes: server infer {result['latencies']['total']} s, "
          f"HTTP round trip {wall:.1f} s")
    labels = np.asarray(Image.open(label))
    assert labels.shape == (240, 200)
    assert set(np.unique(labels).tolist()) <= {0, channel_def()["liver"], channel_def()["lungs"]}
    assert result["label_names"] == channel_def()  # the table, whatever was asked
