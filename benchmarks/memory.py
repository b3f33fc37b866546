"""Memory under load: one ``automedsam segment`` call over many inputs must keep its memory flat.

Writes ``n`` real Kvasir-SEG frames (distinct images, cycled if ``n`` exceeds the set) to a
temporary folder (never into the repository), runs ``automedsam segment FOLDER --output OUT
--quiet`` once over all of them, and samples the process's ``/proc/<pid>/status`` (VmRSS: resident
now; VmHWM: peak resident so far) every ``interval`` seconds. An input counts as done when its
``<stem>_report.json`` appears (written last, by rename). Records RSS and peak RSS when 1, 20,
50, 100, ... and all inputs are done.

    python benchmarks/memory.py [--n 200] [--data_dir ../shared/data] [--out benchmarks/results/memory]

Writes ``memory.json`` and ``memory.md`` (figures, the exact command, machine).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a live process in KiB ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


def automedsam_command() -> list[str]:
    script = Path(sys.executable).parent / "automedsam"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "automedsam.cli"]


def run(n: int = 200, data_dir: str | None = None, interval: float = 0.2, keep: bool = False,
        checkpoints: str = "1,20,50,100,150,200", out: str = str(RESULTS / "memory")) -> None:
    data = Path(data_dir or os.environ.get("AUTOMEDSAM_DATA", REPO.parent / "shared" / "data"))
    images = sorted((data / "polyp" / "kvasir-seg" / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no Kvasir-SEG images under {data} (set --data_dir or AUTOMEDSAM_DATA)")
    if isinstance(checkpoints, (tuple, list)):  # fire turns "1,20" into a tuple
        checkpoints = ",".join(str(c) for c in checkpoints)
    marks = sorted({int(c) for c in str(checkpoints).split(",") if int(c) <= n} | {n})
    work = Path(tempfile.mkdtemp(prefix="automedsam-memory-"))
    try:
        folder, output = work / "inputs", work / "out"
        folder.mkdir()
        for i in range(n):
            shutil.copyfile(images[i % len(images)], folder / f"frame{i:04d}.jpg")
        cmd = automedsam_command() + ["segment", str(folder), "--output", str(output), "--quiet"]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples, at = [], {}
        done = 0
        while proc.poll() is None:
            st = proc_status(proc.pid)
            if st:
                done = len(list(output.glob("*_report.json"))) if output.is_dir() else 0
                samples.append({"t_s": round(time.time() - t0, 2), "done": done, "rss_mib": st["VmRSS"] / 1024,
                                "peak_mib": st["VmHWM"] / 1024})
                for m in marks:
                    if done >= m and m not in at:
                        at[m] = samples[-1]
            time.sleep(interval)
        stderr = proc.stderr.read()
        wall = time.time() - t0
        done = len(list(output.glob("*_report.json")))
        if proc.returncode != 0 or done != n:
            raise SystemExit(f"segment failed (exit {proc.returncode}, {done}/{n} done): {stderr[-2000:]}")
        if n not in at and samples:  # the last input finished between the last sample and exit
            at[n] = {**samples[-1], "done": n, "note": "last sample before exit"}
        per_input = [json.loads(p.read_text())["timings_s"] for p in sorted(output.glob("*_report.json"))]
        mean_inference = sum(t.get("inference_s", 0.0) for t in per_input) / len(per_input)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    first, last = at.get(min(20, n)), at.get(n)
    import torch

    result = {
        "command": " ".join(["python", "benchmarks/memory.py", f"--n {n}"]),
        "segment_command": "automedsam segment <folder of %d Kvasir JPGs> --output <tmp> --quiet" % n,
        "inputs": n,
        "distinct_images": min(n, len(images)),
        "wall_s": round(wall, 1),
        "s_per_input": round(wall / n, 2),
        "mean_inference_s": round(mean_inference, 3),
        "at": {str(k): {kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in s.items()}
               for k, s in sorted(at.items())},
        "peak_rss_mib_at_20": round(first["peak_mib"], 1) if first else None,
        "peak_rss_mib_at_all": round(last["peak_mib"], 1) if last else None,
        "growth_mib_20_to_all": round(last["peak_mib"] - first["peak_mib"], 1) if first and last else None,
        "samples": len(samples),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu"},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {s['t_s']:.0f} | {s['rss_mib']:.0f} | {s['peak_mib']:.0f} |"
                     for k, s in result["at"].items())
    md = f"""# Memory of one `automedsam segment` call over {n} inputs

`{result['command']}` runs `{result['segment_command']}` once and samples
`/proc/<pid>/status` every {interval} s (VmRSS: resident now; VmHWM: peak resident so far).
Inputs: {n} real Kvasir-SEG frames (256x256 RGB JPG, {result['distinct_images']} distinct), polyp
class, CPU ({result['machine']['cpus']} cores, shared with other jobs), torch {result['machine']['torch']},
{result['date']}.

| inputs done | time (s) | RSS (MiB) | peak RSS (MiB) |
|---:|---:|---:|---:|
{rows}

Peak RSS after 20 inputs: **{result['peak_rss_mib_at_20']} MiB**; after all {n}: **{result['peak_rss_mib_at_all']} MiB**
(growth {result['growth_mib_20_to_all']} MiB). Wall {result['wall_s']} s, {result['s_per_input']} s per input
(mean encoder+decoder time {result['mean_inference_s']} s; the rest is start-up, model load, reading and writing
under CPU contention).
"""
    out_path.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    import fire

    fire.Fire(run)
