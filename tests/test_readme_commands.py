"""Every shell command in README.md and the model card (bundles/automedsam/docs/README.md), as
written, from where they say to run them: the repository root of a fresh copy of this checkout
(tracked and untracked-but-not-ignored files; ``../shared/data`` beside it links to the real
data), in the installed environment.

Each fenced ``bash`` block is split into commands (continuation lines joined, comments
dropped). Every command must match exactly one entry of :data:`PLAN`: either it is run - with
the shortening that entry states (placeholder file names such as ``scan.nii.gz`` made from real
data; subsets; one epoch) - and its outputs are checked, or it is not run here, with the reason
(another test covers it, or it installs software, needs a GUI/PACS or runs for hours). A command
added to the docs without a plan entry fails :func:`test_every_documented_command_has_a_plan`.

Runtime: the real encoder runs on 8 slices in all and 12 processes start (each imports torch and
MONAI and builds the network): about 5 minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = {"README.md": REPO / "README.md", "model card": REPO / "bundles" / "automedsam" / "docs" / "README.md"}
POLYP = "polyp/kvasir-seg/images/cju15jr8jz8sb0855ukmkswkz.jpg"
CT = "abdomen-ct/totalseg-example/ct.nii.gz"


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command in the documents' fenced bash blocks."""
    out = []
    for doc, path in DOCS.items():
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                line = re.sub(r"\s+#\s.*$", "", line)  # trailing comment (after whitespace)
                out.append((doc, " ".join(line.split())))
    return out


# ------------------------------------------------------------------------------------ the plan
# (pattern matched at the start of the command, what happens). "run": a function below that runs
# it in the copy (shortened as its docstring says); "skip": why it is not run here.

SKIP_INSTALL = "installs software (pip, apt, venv); the tests run in the installed environment"
SKIP_MONAILABEL = ("MONAI Label server and client calls: tests/test_monailabel_server.py starts a real server in "
                   "its own environment and makes these requests")
SKIP_DIST = "torchrun multi-process training: tests/test_distributed.py runs it with 2 gloo processes"
SKIP_LONG = "a benchmark (minutes to hours of CPU): tests/test_ablations.py and the benchmarks' own runs cover it"

PLAN: list[tuple[str, str]] = [
    (r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -r requirements\.txt && pip install "
     r"--no-deps -e \. && automedsam demo --output outputs/demo$", "run:demo"),
    (r"\. \.venv/bin/activate && python -m pytest -q$", "skip:it is this test suite"),
    (r"automedsam segment scan\.nii\.gz --output out/ --classes liver,spleen$", "run:segment_volume"),
    (r"automedsam segment dicom_series_folder/ --output out/$", "run:segment_dicom"),
    (r"automedsam segment frame\.jpg --output out/ --modality endoscopy$", "run:segment_2d"),
    (r"automedsam segment --help$", "run:segment_help"),
    (rf"automedsam segment \.\./shared/data/{POLYP} --output out$", "run:segment_real_polyp"),
    (r"python -m monai\.bundle run training --config_file bundles/automedsam/configs/train\.yaml$", "run:train"),
    (r"python -m monai\.bundle run training --config_file bundles/automedsam/configs/train\.yaml --datalists "
     r"\"\['kvasir','shenzhen'\]\" --max_cases 4 --train#trainer#max_epochs 1 --output_dir runs/short$", "run:train_short"),
    (r"python -m monai\.bundle run training --config_file bundles/automedsam/configs/train\.yaml --init_weights "
     r"bundles/automedsam/models/model\.pt --output_dir runs/finetune$", "run:train_finetune"),
    (r"python -m monai\.bundle run evaluate --config_file \"\['bundles/automedsam/configs/inference\.yaml',"
     r"'bundles/automedsam/configs/evaluate\.yaml'\]\"$", "run:evaluate"),
    (r"python -m monai\.bundle run inference --config_file bundles/automedsam/configs/inference\.yaml --input "
     r"scan\.nii\.gz$", "run:inference"),
    (r"python -m monai\.bundle run inference --config_file bundles/automedsam/configs/inference\.yaml --help$",
     "run:inference_help"),
    (r"automedsam cache --datalist kvasir,shenzhen,brats,totalseg --cache_dir cache --split training,validation$",
     "run:cache"),
    (r"python -m monai\.bundle verify_net_in_out export_net --config_file bundles/automedsam/configs/inference\.yaml "
     r"--meta_file bundles/automedsam/configs/metadata\.json --device cpu$", "run:verify_net"),
    (r"python benchmarks/", "skip:" + SKIP_LONG),
    # adding a class trains for minutes: tests/test_add_class.py adds one to a copy of the bundle from
    # 4 real images through the same add_class and segments with it, test_add_class_cli.py checks
    # the command line reaches it, and the bundle route's test there runs add_class.yaml
    (r"automedsam add-class |python -c \"from automedsam\.adapt import add_class; |python -m monai\.bundle run "
     r"training --config_file \"\['configs/train\.yaml','configs/add_class\.yaml'\]\" |automedsam segment scan\.png "
     r"--bundle my_bundle ", "skip:adding a class trains for minutes (tests/test_add_class.py runs it on 4 images)"),
    (r"torchrun ", "skip:" + SKIP_DIST),
    (r"python3\.11 -m venv|pip install|SAM2_BUILD_CUDA=0 pip install", "skip:" + SKIP_INSTALL),
    (r"\. \.venv-monailabel/bin/activate$", "skip:" + SKIP_INSTALL),
    (r"monailabel start_server |curl ", "skip:" + SKIP_MONAILABEL),
]


def plan_for(command: str) -> list[str]:
    return [what for pattern, what in PLAN if re.match(pattern, command)]


def test_every_documented_command_has_a_plan():
    commands = documented_commands()
    assert len(commands) >= 20, commands
    for doc, command in commands:
        plans = plan_for(command)
        assert len(plans) == 1, f"{doc}: {command!r} matches {plans or 'no plan entry'}: add one to PLAN"
    ran = {plan_for(c)[0] for _, c in commands}
    missing = {what for _, what in PLAN if what.startswith("run:")} - ran
    assert not missing, f"plan entries whose command is no longer documented: {missing}"


# ------------------------------------------------------------------------------------ the fresh copy


@pytest.fixture(scope="module")
def copy(data_root, tmp_path_factory) -> dict:
    """A copy of the checkout (git's tracked and untracked, not ignored, files) with
    ``../shared/data`` linked to the real data, placeholder inputs made from real data, and a
    the documented defaults (``cache/``, ``runs/train``) relative to the copy's root."""
    base = tmp_path_factory.mktemp("fresh")
    root = base / "main"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    (base / "shared").mkdir()
    (base / "shared" / "data").symlink_to(data_root)
    # placeholders the docs name: two slices of the real CT (liver, spleen, kidneys) as a NIfTI
    # volume and as a DICOM series, a polyp frame
    nib.save(nib.load(str(data_root / CT)).slicer[:, :, 15:17], str(root / "scan.nii.gz"))
    sys.path.insert(0, str(REPO / "tests"))
    from test_segment import write_ct_dicom_series

    scan = nib.load(str(root / "scan.nii.gz"))
    write_ct_dicom_series(np.asarray(scan.dataobj), scan.affine, root / "dicom_series_folder")
    shutil.copy(data_root / POLYP, root / "frame.jpg")
    env = {**os.environ, "AUTOMEDSAM_DATA": str(base / "shared" / "data")}
    for var in ("AUTOMEDSAM_RUNS", "AUTOMEDSAM_BUNDLE", "AUTOMEDSAM_CACHE"):  # the documented defaults
        env.pop(var, None)
    bundle = sorted(p.name for p in (root / "bundles" / "automedsam").iterdir())
    return {"root": root, "env": env, "data": data_root, "bundle": bundle}


def sh(copy, command: str, *extra: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The documented command plus the stated shortening, in the copy's root (tools from the
    active environment)."""
    args = shlex.split(command) + list(extra)
    exe = {"python": sys.executable, "automedsam": str(Path(sys.executable).parent / "automedsam")}
    args[0] = exe.get(args[0], args[0])
    proc = subprocess.run(args, cwd=copy["root"], env={**copy["env"], **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{command} {' '.join(extra)}\n{proc.stderr[-3000:]}"
    return proc


def command(name: str) -> str:
    return next(c for _, c in documented_commands() if plan_for(c) == [f"run:{name}"])


def bundle_version() -> str:
    return json.loads((REPO / "bundles/automedsam/configs/metadata.json").read_text())["version"]


# ------------------------------------------------------------------------------------ README


def test_demo(copy):
    """Shortened: only the demo part of the chain (the install steps are not run), and only its
    polyp case (``AUTOMEDSAM_DEMO_CASES=polyp``; the whole demo's time is in the README)."""
    demo = command("demo").split("&& ")[-1]
    proc = sh(copy, demo, env={"AUTOMEDSAM_DEMO_CASES": "polyp"})
    out = copy["root"] / "outputs" / "demo"
    stem = Path(POLYP).stem
    seg = np.asarray(Image.open(out / f"{stem}_seg.png"))
    assert seg.shape == (256, 256) and set(np.unique(seg)) <= {0, 7}
    report = json.loads((out / f"{stem}_report.json").read_text())
    assert report["model"]["version"] == bundle_version() and len(report["model"]["weights_sha256"]) == 64
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("endoscopy polyp:"))
    assert re.search(r"Dice polyp 0\.\d{3}; \d+ s -> ", line), line


def test_segment_commands(copy):
    """The segment examples on placeholders: scan.nii.gz = a 2-slice crop of the real CT,
    dicom_series_folder/ = the same crop as a DICOM series, frame.jpg = a real Kvasir polyp."""
    out = copy["root"] / "out"
    sh(copy, command("segment_volume"))
    seg, src = nib.load(str(out / "scan_seg.nii.gz")), nib.load(str(copy["root"] / "scan.nii.gz"))
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2} and (np.asarray(seg.dataobj) == 1).any()
    sh(copy, command("segment_dicom"))
    assert (out / "dicom_series_folder_seg.nii.gz").is_file() and (out / "dicom_series_folder_seg.dcm").is_file()
    sh(copy, command("segment_2d"))
    assert np.asarray(Image.open(out / "frame_seg.png")).shape == (256, 256)
    helped = sh(copy, command("segment_help"))
    assert "--output" in helped.stdout + helped.stderr


def test_segment_real_example_matches_the_readme(copy):
    """The README's real example: its Dice against the expert mask is what the README says (0.879)."""
    from automedsam.engine import slice_dice

    sh(copy, command("segment_real_polyp"))
    stem = Path(POLYP).stem
    pred = np.asarray(Image.open(copy["root"] / "out" / f"{stem}_seg.png")) == 7
    mask = np.asarray(Image.open(copy["data"] / POLYP.replace("images", "masks")).convert("L")) > 127
    dice = float(slice_dice(pred, mask))
    assert "Dice 0.879" in DOCS["README.md"].read_text()
    assert abs(dice - 0.879) < 0.01, dice


# ------------------------------------------------------------------------------------ the bundle

SHORT = ("--datalists", "['kvasir']", "--max_cases", "1")  # one Kvasir case per split


def test_bundle_cache_training_and_evaluation(copy):
    """Shortened: ``automedsam cache`` with ``--datalist kvasir --max_cases 1`` (2 images); the
    training commands on those (``--datalists "['kvasir']" --max_cases 1``; the short run with
    ``['kvasir']`` for ``['kvasir','shenzhen']`` and ``--max_cases 1`` for 4; the first one also
    ``--build_cache False``) for one epoch; evaluation on the one validation case."""
    root = copy["root"]
    cache_cmd = command("cache").replace("--datalist kvasir,shenzhen,brats,totalseg", "--datalist kvasir")
    sh(copy, cache_cmd, "--max_cases", "1")
    assert any((root / "cache").rglob("*")), "the documented --cache_dir cache is relative to the repository root"
    sh(copy, command("train"), *SHORT, "--train#trainer#max_epochs", "1", "--build_cache", "False")
    assert (root / "runs" / "train" / "model.pt").is_file()
    short = command("train_short").replace("--max_cases 4", "--max_cases 1").replace("'kvasir','shenzhen'", "'kvasir'")
    sh(copy, short)
    assert (root / "runs" / "short" / "model.pt").is_file()
    sh(copy, command("train_finetune"), *SHORT, "--train#trainer#max_epochs", "1")
    assert (root / "runs" / "finetune" / "model.pt").is_file()
    proc = sh(copy, command("evaluate"), *SHORT)
    with open(root / "outputs" / "eval" / "metrics.csv") as fh:
        rows = fh.read().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[4] == "polyp", rows
    assert "[1/1]" in proc.stderr and "done in" in proc.stderr  # progress per case
    assert sorted(p.name for p in (root / "bundles" / "automedsam").iterdir()) == copy["bundle"], \
        "nothing may be written into the bundle"


def test_bundle_inference_and_help(copy):
    """``--input scan.nii.gz`` is the 2-slice CT crop; outputs go to outputs/inference (not into
    the bundle); ``--help`` runs nothing. (A second run's refusal to overwrite, and the other
    one-line refusals: tests/test_bundle.py.)"""
    root = copy["root"]
    proc = sh(copy, command("inference"))
    seg = nib.load(str(root / "outputs" / "inference" / "scan_seg.nii.gz"))
    assert seg.shape == nib.load(str(root / "scan.nii.gz")).shape
    assert "[1/1]" in proc.stderr and "done in" in proc.stderr and "slice" in proc.stderr
    assert sorted(p.name for p in (root / "bundles" / "automedsam").iterdir()) == copy["bundle"]
    helped = sh(copy, command("inference_help"))
    assert "--input PATH" in helped.stdout


def test_verify_net_in_out_command(copy):
    """The model card's model-zoo check, as written (one forward pass of random data)."""
    proc = sh(copy, command("verify_net"))
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
