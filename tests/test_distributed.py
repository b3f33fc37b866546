"""Distributed runs on real data: 2 CPU processes (gloo) under torchrun, as subprocesses.

* The embedding cache built by 2 ranks (``build_cache`` under torchrun, rank/world size from the
  environment) holds the same entries as a single-process build, and no file is written twice:
  every write (``cache._atomic_bytes``) is logged per process and the ranks' logs are disjoint.
* multi_gpu_train.yaml on train.yaml for 2 epochs: the ranks end (and pass every epoch) with
  identical weights, loss weights and optimiser state, equal to rank 0's model.pt; each epoch
  their DistributedSampler shards are disjoint and together cover the dataset; one set of files
  (checkpoint, model.pt, best_model.pt, TensorBoard) is written, by rank 0 only, and only rank 0
  logs at INFO.

What each rank saw and its final state come from :class:`RankProbe`, a trainer handler that this
module adds through one more config file (``+train#handlers``): nothing test-only in the bundle.
The subprocesses import this module for it (``tests`` on PYTHONPATH).

Data: 3 Kvasir polyps and a 3-slice crop of the TotalSegmentator CT, copied to tmp. CPU budget:
the encoder costs seconds per slice, so the cache is 6 slices; each test takes 1-2 minutes
on 2 cores (torch limited to one thread per process).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "automedsam"
CT = "abdomen-ct/totalseg-example/ct.nii.gz"
CT_LABEL = "abdomen-ct/totalseg-example/label.nii.gz"
CT_SLICES = (15, 18)  # 3 slices with liver, spleen, both kidneys and pancreas
N_POLYPS = 3
TIMEOUT_S = 300

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")


# ------------------------------------------------------------------------------------ in the ranks


def state_sha256(state: dict) -> str:
    """sha256 of a (nested) state dict: keys, tensor bytes, other values' repr."""
    import torch

    h = hashlib.sha256()

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(f"{prefix}.{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        elif torch.is_tensor(v):
            h.update(f"{prefix}:{v.dtype}:{tuple(v.shape)}".encode())
            h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{prefix}={v!r}".encode())

    walk("", state)
    return h.hexdigest()


class RankProbe:
    """Trainer handler (added by the test's extra config): per epoch, the (case, slice, class) of
    every sample this rank trained on and the dataset's samples of that epoch, and the hashes of
    the trainable weights, loss weights and optimiser state; written to ``out_dir/rank<R>.json``
    when training completes."""

    def __init__(self, out_dir: str, rank: int, network, loss, optimizer, dataset):
        self.out_dir, self.rank = out_dir, int(rank)
        self.network, self.loss, self.optimizer, self.dataset = network, loss, optimizer, dataset
        self.seen: list[list[int]] = []
        self.epochs: dict[str, dict] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration(self, engine) -> None:
        b = engine.state.batch
        self.seen += [[int(c), int(s), int(k)] for c, s, k in zip(b["case_index"], b["slice_index"], b["class_id"])]

    def hashes(self) -> dict:
        from automedsam.engine import TrainableState

        return {"model": state_sha256(TrainableState(self.network).state_dict()),
                "loss": state_sha256(getattr(self.loss, "module", self.loss).state_dict()),
                "optimizer": state_sha256(self.optimizer.state_dict()["state"])}

    def epoch(self, engine) -> None:
        self.epochs[str(engine.state.epoch)] = {
            "seen": self.seen, "dataset": [[s.entry, s.slice, s.class_id] for s in self.dataset.samples],
            **self.hashes()}
        self.seen = []

    def completed(self, engine) -> None:
        rec = {"rank": self.rank, "pid": os.getpid(), "epochs": self.epochs, **self.hashes()}
        os.makedirs(self.out_dir, exist_ok=True)
        Path(self.out_dir, f"rank{self.rank}.json").write_text(json.dumps(rec))


PROBE_CONFIG = """\
+imports:
  - $import test_distributed
probe_dir: null
+train#handlers:
  - _target_: test_distributed.RankProbe
    out_dir: "@probe_dir"
    rank: "@rank"
    network: "@network"
    loss: "@loss_function"
    optimizer: "@train#optimizer"
    dataset: "@train#dataset"
"""

# build_cache in one process (python) or in each rank (torchrun; rank and world size from the
# environment), logging every file it writes to writes-<rank>.json
CACHE_SCRIPT = """\
import json, os, sys
import automedsam.data.cache as cache_mod

out, datalists, base_dir, cache_dir = sys.argv[1:5]
rank = int(os.environ.get("RANK", 0))
written = []
atomic = cache_mod._atomic_bytes

def logged(path, data):
    written.append(os.path.relpath(str(path), cache_dir))
    atomic(path, data)

cache_mod._atomic_bytes = logged
stats = cache_mod.build_cache(datalists, base_dir=base_dir, cache_dir=cache_dir, split="training,validation",
                              batch_size=2, progress=False)
with open(os.path.join(out, f"writes-{rank}.json"), "w") as fh:
    json.dump({"written": written, "stats": stats}, fh)
"""


# ------------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # CPU, gloo
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def run(cmd: list[str], log: Path, cwd: Path = REPO, timeout: float = TIMEOUT_S, extra: str = "") -> float:
    """Run ``cmd`` in its own process group (all of it is killed on timeout); fail with the log's
    tail unless it exits 0. Returns the seconds it took."""
    t0 = time.time()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    if rc != 0:
        pytest.fail(f"{' '.join(cmd[:8])} ...: exit {rc}\n{extra}{log.read_text(errors='replace')[-6000:]}")
    return time.time() - t0


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(data_root, tmp_path_factory) -> dict:
    """3 Kvasir polyps (the first one also the validation split) and the 3-slice CT crop (training
    and validation), with one datalist per dataset, in tmp."""
    import nibabel as nib

    d = tmp_path_factory.mktemp("distdata")
    folder = data_root / "polyp" / "kvasir-seg"
    names = sorted(p.name for p in (folder / "images").glob("*.jpg"))[:N_POLYPS]
    polyps = []
    for n in names:
        (d / n).write_bytes((folder / "images" / n).read_bytes())
        (d / f"mask_{n}").write_bytes((folder / "masks" / n).read_bytes())
        polyps.append({"image": n, "label": f"mask_{n}"})
    z0, z1 = CT_SLICES
    nib.save(nib.load(str(data_root / CT)).slicer[:, :, z0:z1], str(d / "ct3.nii.gz"))
    nib.save(nib.load(str(data_root / CT_LABEL)).slicer[:, :, z0:z1], str(d / "label3.nii.gz"))
    ct = [{"image": "ct3.nii.gz", "label": "label3.nii.gz"}]
    lists = []
    for name, dataset, modality, training, validation in (("kvasir_tiny", "kvasir", "endoscopy", polyps, polyps[:1]),
                                                          ("totalseg_tiny", "totalseg", "ct", ct, ct)):
        path = d / f"{name}.json"
        path.write_text(json.dumps({"name": name, "dataset": dataset, "modality": modality,
                                    "training": training, "validation": validation}))
        lists.append(str(path))
    return {"dir": d, "lists": lists}


def build(tiny, tmp_path_factory, nproc: int) -> dict:
    """The cache of both datalists (training and validation) built by ``nproc`` processes."""
    work = tmp_path_factory.mktemp(f"cache{nproc}")
    script = work / "build.py"
    script.write_text(CACHE_SCRIPT)
    cache_dir = work / "cache"
    args = [str(script), str(work), ",".join(tiny["lists"]), str(tiny["dir"]), str(cache_dir)]
    cmd = (torchrun(nproc) if nproc > 1 else [sys.executable]) + args
    seconds = run(cmd, work / "log.txt")
    ranks = [json.loads((work / f"writes-{r}.json").read_text()) for r in range(nproc)]
    return {"dir": cache_dir, "ranks": ranks, "seconds": seconds}


@pytest.fixture(scope="module")
def single_cache(tiny, tmp_path_factory) -> dict:
    return build(tiny, tmp_path_factory, 1)


# ------------------------------------------------------------------------------------ tests


def test_distributed_cache_build_matches_a_single_process_build(tiny, single_cache, tmp_path_factory):
    import numpy as np

    from automedsam.data.cache import EmbeddingCache, owner_rank

    dist = build(tiny, tmp_path_factory, 2)
    one = single_cache["ranks"][0]
    n_slices = N_POLYPS + (CT_SLICES[1] - CT_SLICES[0])
    assert one["stats"]["slices"] == n_slices and one["stats"]["computed"] == n_slices, one["stats"]

    # every rank wrote only its own files, each once; together exactly what one process wrote
    writes = [r["written"] for r in dist["ranks"]]
    for w in writes + [one["written"]]:
        assert len(w) == len(set(w)), f"a file written twice by one process: {sorted(w)}"
    assert not set(writes[0]) & set(writes[1]), f"written by both ranks: {sorted(set(writes[0]) & set(writes[1]))}"
    assert set(writes[0]) | set(writes[1]) == set(one["written"])
    for r, w in enumerate(writes):
        assert all(owner_rank(Path(p).stem, 2) == r for p in w), (r, w)
    slices = [p for p in one["written"] if p.startswith("slices/")]
    assert len(slices) == n_slices
    assert {owner_rank(Path(p).stem, 2) for p in slices} == {0, 1}, "the test slices all fall to one rank"
    stats = [r["stats"] for r in dist["ranks"]]
    assert [s["rank"] for s in stats] == [0, 1] and all(s["world_size"] == 2 for s in stats)
    assert [s["computed"] for s in stats] == [sum(owner_rank(Path(p).stem, 2) == r for p in slices)
                                              for r in (0, 1)]

    # the same files, with the same contents
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert files(dist["dir"]) == files(single_cache["dir"]) == set(one["written"])
    for p in sorted(files(dist["dir"])):
        if p.startswith("cases/"):
            assert json.loads((dist["dir"] / p).read_text()) == json.loads((single_cache["dir"] / p).read_text())
    a, b = EmbeddingCache(single_cache["dir"]), EmbeddingCache(dist["dir"])
    for p in slices:
        key = Path(p).stem
        x, y = a.load(key), b.load(key)  # checksums verified
        assert x["meta"] == y["meta"]
        np.testing.assert_array_equal(x["geometry"].to_array(), y["geometry"].to_array())
        for k in ("class_ids", "boxes", "masks"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{p} {k}")
        for k in ("embedding", "teacher", "teacher_iou"):  # same code, one CPU thread each: the same numbers
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{p} {k}")


def test_two_process_training_keeps_the_ranks_identical(tiny, single_cache, tmp_path):
    """multi_gpu_train.yaml under torchrun, 2 processes, 2 epochs, on the cache built above."""
    import math

    import torch

    out, probe_dir = tmp_path / "run", tmp_path / "probe"
    probe = tmp_path / "probe.yaml"
    probe.write_text(PROBE_CONFIG)
    logs = tmp_path / "ranklogs"
    configs = ["configs/train.yaml", "configs/multi_gpu_train.yaml", str(probe)]
    overrides = {"datalists": repr(tiny["lists"]), "dataset_dir": str(tiny["dir"]),
                 "cache_dir": str(single_cache["dir"]), "output_dir": str(out), "probe_dir": str(probe_dir),
                 "slice_step": "1", "cross_domain_ratio": "0.0", "batch_size": "4",
                 "train#trainer#max_epochs": "2"}
    cmd = torchrun(2) + ["--log-dir", str(logs), "--redirects", "3", "-m", "monai.bundle", "run", "training",
                         "--config_file", repr(configs), "--bundle_root", ".",
                         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for k, v in overrides.items():
        cmd += [f"--{k}", v]

    def rank_log(rank: int) -> str:
        found = sorted(logs.rglob(f"attempt_*/{rank}/stdout.log"))
        return found[-1].read_text(errors="replace") if found else ""

    try:
        run(cmd, tmp_path / "torchrun.txt", cwd=BUNDLE)
    except pytest.fail.Exception as e:
        raise AssertionError(f"{e}\n--- rank 0:\n{rank_log(0)[-4000:]}\n--- rank 1:\n{rank_log(1)[-4000:]}") from None

    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]

    # identical weights, loss weights and optimiser state on both ranks, every epoch and at the end
    for key in ("model", "loss", "optimizer"):
        assert ranks[0][key] == ranks[1][key], f"the ranks' {key} differ at the end"
        for e in ("1", "2"):
            assert ranks[0]["epochs"][e][key] == ranks[1]["epochs"][e][key], f"the ranks' {key} differ at epoch {e}"
    assert ranks[0]["epochs"]["1"]["model"] != ranks[0]["epochs"]["2"]["model"], "no training step was taken"
    saved = torch.load(out / "model.pt", map_location="cpu")
    assert state_sha256(saved) == ranks[0]["model"], "model.pt is not the ranks' weights"

    # each epoch: the same dataset on both ranks; disjoint shards covering it
    shards = {}
    for e in ("1", "2"):
        dataset = ranks[0]["epochs"][e]["dataset"]
        assert dataset == ranks[1]["epochs"][e]["dataset"], f"epoch {e}: the ranks' datasets differ"
        samples = {tuple(s) for s in dataset}
        assert len(samples) == len(dataset) and len(dataset) % 2 == 0, \
            f"{len(dataset)} samples: the test wants an even count (no DistributedSampler padding)"
        seen = [[tuple(s) for s in r["epochs"][e]["seen"]] for r in ranks]
        assert [len(s) for s in seen] == [len(dataset) // 2] * 2 == [math.ceil(len(dataset) / 2)] * 2
        assert all(len(set(s)) == len(s) for s in seen), f"epoch {e}: a rank saw a sample twice"
        assert not set(seen[0]) & set(seen[1]), f"epoch {e}: both ranks trained on {set(seen[0]) & set(seen[1])}"
        assert set(seen[0]) | set(seen[1]) == samples, f"epoch {e}: samples no rank saw"
        shards[e] = set(seen[0])
    assert shards["1"] != shards["2"], "the shards are not reshuffled per epoch (sampler.set_epoch)"

    # one set of files, all from rank 0
    names = sorted(p.name for p in out.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert sorted(set(names) - set(events)) == ["best_model.pt", "checkpoint_epoch=2.pt", "loss_weights.csv",
                                                 "model.pt"], names
    assert len((out / "loss_weights.csv").read_text().splitlines()) == 3  # header + one row per epoch, rank 0 only
    assert len(events) == 2, f"TensorBoard files (train and validation, rank 0): {events}"
    assert {n.split(".")[-2] for n in events} == {str(ranks[0]["pid"])}, f"not all from rank 0: {events}"
    ckpt = torch.load(out / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert state_sha256(ckpt["model"]) == ranks[0]["model"]

    # only rank 0 logs at INFO (the other ranks keep warnings and errors); the one INFO line before
    # the config's initialize runs (monai.bundle's logging setup) is on every rank
    log0, log1 = rank_log(0), rank_log(1)
    assert "Epoch[2] Complete" in log0 and "Saved checkpoint" in log0, log0[-3000:]
    info1 = [line for line in log1.splitlines() if " - INFO - " in line and "Setting logging properties" not in line]
    assert not info1, "rank 1 logged:\n" + "\n".join(info1[:20])
