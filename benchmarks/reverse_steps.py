"""Accuracy of the reverse diffusion's S (prompt_encoder reverse_steps), on a reduced protocol.

    python benchmarks/reverse_steps.py --runs one_pass=RUN_DIR,s4=RUN_DIR [--steps 1,2,4,8]

Each RUN_DIR is a finished `monai.bundle run training` output folder holding ``args.json`` (the
overrides it was trained with, as benchmarks/ablations.py writes them) and ``model.pt``. Each run's
network is rebuilt from train.yaml with those overrides, its weights loaded, and judged on the
validation slices of its own datalists and cache (``validate#dataset``: every present slice,
every in-modality negative, cross-domain negatives at 0.25 per positive) with the validation
metric (:class:`automedsam.engine.PerClassSliceMetrics`: Dice on present slices, presence gate
on, and the share of absent slices answered empty). A run with a reverse diffusion is judged at
every S in ``steps`` (the same weights, ``reverse.steps`` set to S; S = 1 is the denoiser's single
guess from noise); a one-pass run once. Writes benchmarks/results/reverse_steps.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TRAIN_CONFIG = REPO / "bundles" / "automedsam" / "configs" / "train.yaml"


def _parser(args: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser.update({**args, "decoder_runtime": "eager", "device": "$torch.device('cpu')"})
    return parser


def evaluate_run(run_dir: Path, steps: list[int], batch_size: int = 8) -> dict:
    from automedsam.engine import PerClassSliceMetrics

    args = json.loads((run_dir / "args.json").read_text())
    parser = _parser(args)
    net = parser.get_parsed_content("network_def")
    net.load_trainable(str(run_dir / "model.pt"))
    net.eval()
    dataset = parser.get_parsed_content("validate#dataset")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    rev = net.class_prompt_encoder.reverse
    rows = {}
    for s in (steps if rev is not None else [None]):
        if rev is not None:
            rev.steps = s
        metric = PerClassSliceMetrics()
        metric.reset()
        t0, n = time.perf_counter(), 0
        with torch.no_grad():
            for batch in loader:
                probs = net(embeddings=batch["embedding"], class_ids=batch["class_id"]).probabilities()
                metric.update((probs, {"mask": batch["mask"], "class_id": batch["class_id"]}))
                n += len(probs)
        rows[str(s if s is not None else "one-pass")] = {
            **{k: round(v, 4) for k, v in metric.compute().items()},
            "decode_s_per_item": round((time.perf_counter() - t0) / max(n, 1), 4), "items": n,
            "present_slices": sum(len(v) for v in metric.dice.values())}
    return {"args": args, "rows": rows, "samples": dataset.counts()}


def run(runs: str, steps: str = "1,2,4,8", out: str = str(RESULTS / "reverse_steps"), note: str = ""):
    named = dict(item.split("=", 1) for item in (runs.split(",") if isinstance(runs, str) else runs))
    for name, d in named.items():
        for f in ("args.json", "model.pt"):
            if not (Path(d) / f).is_file():
                raise SystemExit(f"reverse_steps: {Path(d) / f} not found (run {name} has not finished training)")
    s_list = [int(s) for s in (steps.split(",") if isinstance(steps, str) else steps)]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "note": note,
              "runs": {name: evaluate_run(Path(d), s_list) for name, d in named.items()}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    metrics = sorted({k for r in result["runs"].values() for row in r["rows"].values() for k in row
                      if k.startswith(("dice_", "empty_"))})
    L = ["# Reverse diffusion: accuracy against S", "", f"`{command}` ({result['date']}).", ""]
    if note:
        L += [note, ""]
    L += ["| run | S at inference | " + " | ".join(metrics) + " | mean Dice | decode s/item |",
          "|---|---|" + "---|" * (len(metrics) + 2)]
    for name, r in result["runs"].items():
        for s, row in r["rows"].items():
            L.append(f"| {name} | {s} | " + " | ".join(str(row.get(m, "-")) for m in metrics)
                     + f" | {row['mean_dice']} | {row['decode_s_per_item']} |")
    L += ["", "Samples per run (validation): " + "; ".join(f"{n}: {r['samples']}" for n, r in result["runs"].items()),
          ""]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    import fire

    fire.Fire(run)
