"""The ``automedsam`` command: ``automedsam segment ...``, ``automedsam cache ...``, ``automedsam demo``
(also ``python -m automedsam ...``).

The whole command line is parsed and checked (argparse, then
:func:`automedsam.options.segment_options`) before any work: a mistyped option, a bad value or a
file name starting with ``-`` is refused with one line and exit status 2, and nothing is read or
written. Errors are one line on stderr, ``automedsam: error: ...``; exit status 0 only on success,
1 when some inputs failed, 2 for a problem of the run, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import AutoMedSAMError, one_line

PROG = "automedsam"

SEGMENT_HELP = """\
Segment images or volumes by class name.

INPUT: a NIfTI file, a DICOM series folder, a 2D image (PNG/JPG/BMP/TIFF), a MedSAM .npz, or a
folder of such files (each segmented in turn, the model loaded once; a bad file is reported and
skipped, and the exit status is then 1). A file name starting with '-' is written ./-name.

Outputs in DIR, named after each input's stem: <stem>_seg.nii.gz (volumes; uint8 label map on the
input's voxel grid and affine) or <stem>_seg.png (2D), <stem>_overlay.png, <stem>_report.json,
<stem>_seg.dcm (DICOM-SEG, DICOM input), <stem>_uncertainty.nii.gz/.png (--uncertainty). Files
this tool wrote are never taken as inputs, so DIR may be the input folder. Label ids: 1 liver,
2 spleen, 3 kidney_left, 4 kidney_right, 5 pancreas, 6 brain_tumor, 7 polyp, 8 lungs.

Every option is checked before any work. Bad input (a missing, truncated or unreadable file, a 1D
or 4D array, a constant image, NaN/Inf voxels, values far outside any modality's range, more
voxels than --max_voxels) is refused with one line naming the file; nothing is written for it,
and every output is written under a temporary name and renamed into place.

Corrections name their class with a prefix when --classes lists several, e.g.
  --box liver:40,30,90,80,12 --point liver:60,55,12,1   (column, row, slice, label)
"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``automedsam: error: ...``, exit status 2)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        raise _UsageError(f"{message} (see: {self.prog} --help)")


class _UsageError(Exception):
    pass


def _add(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """An option spelt ``--max_voxels``, also accepted as ``--max-voxels`` (as fire accepted it)."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*flags, dest=name, **kw)


def _num_views(text: str):
    from .data.augment import parse_num_views

    try:
        return parse_num_views(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _whole(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}") from None
        if v != int(v):
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, got {text!r}")
        return int(v)

    return parse


def build_parser() -> dict[str, _Parser]:
    """{command: its parser}; ``""`` is the top-level parser (for ``automedsam --help``)."""
    top = _Parser(prog=PROG, description="AutoMedSAM: class-prompted MedSAM segmentation.",
                  formatter_class=argparse.RawDescriptionHelpFormatter,
                  epilog="commands:\n  segment   segment images or volumes by class name\n"
                         "  cache     encode a datalist's slices once into the embedding cache\n"
                         "  demo      segment one sample per domain with the shipped weights\n"
                         "  add-class teach a new class from a few labelled images (a new bundle)\n\n"
                         f"`{PROG} COMMAND --help` lists each command's options.")
    top.add_argument("command", choices=("segment", "cache", "demo", "add-class"), metavar="COMMAND")

    seg = _Parser(prog=f"{PROG} segment", description=SEGMENT_HELP, allow_abbrev=False,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    seg.add_argument("inputs", nargs="*", metavar="INPUT", help="files or folders to segment")
    _add(seg, "output", metavar="DIR", help="the output folder (created if needed)")
    _add(seg, "classes", metavar="NAMES", help="comma-separated class names or ids (default: every class of the "
                                               "modality); unknown names are refused, classes not expected in the "
                                               "modality give a warning")
    _add(seg, "modality", metavar="ct|mr|endoscopy|xray",
         help="default: the DICOM Modality tag, else guessed from the values (HU-like volumes ct, z-scored float "
              "or positive-only volumes mr, colour 2D images endoscopy, grey ones xray)")
    _add(seg, "device", default="cpu", metavar="cpu|cuda|cuda:N", help="where the model runs (default cpu)")
    _add(seg, "weights", metavar="FILE", help="AutoMedSAM weights (default: the bundle's models/model.pt)")
    _add(seg, "bundle", metavar="DIR", help="bundle folder (default: $AUTOMEDSAM_BUNDLE or bundles/automedsam)")
    _add(seg, "largest_component", action="store_true",
         help="keep only the largest connected 3D component per class (lungs: two)")
    _add(seg, "uncertainty", default="0", metavar="N",
         help="N noise draws (2..32); writes the per-pixel spread (max over classes)")
    _add(seg, "box", action="append", metavar="[CLASS:]X0,Y0,X1,Y1[,SLICE]",
         help="correct one class with a box in the input's pixels (column x, row y; for volumes the slice as "
              "stored, then required); one per class; one input")
    _add(seg, "point", action="append", metavar="[CLASS:]X,Y[,SLICE],LABEL",
         help="correct one class with a point (label 1 object, 0 background); repeat, or separate with ';'; all "
              "corrections of a class on one slice")
    _add(seg, "overwrite", action="store_true", help="replace existing outputs (otherwise refused, nothing written)")
    _add(seg, "quiet", action="store_true", help="no progress bar and no per-input summary")
    _add(seg, "threshold", default="0.5", metavar="P", help="foreground probability threshold (0.5)")
    _add(seg, "batch_size", metavar="N", help="slices per image-encoder call (default 4 on CPU, 16 on CUDA)")
    _add(seg, "max_voxels", metavar="N",
         help="refuse inputs with more voxels than this, from the file's header before its data is read (default "
              "$AUTOMEDSAM_MAX_VOXELS or 268435456 = 2**28; 0: no limit)")
    _add(seg, "series_uid", metavar="UID|all",
         help="a DICOM folder holding several series is refused, listing them: name the one to segment, or "
              "'all' for each in turn")
    _add(seg, "allow_gaps", action="store_true", help="go on with a DICOM series that misses slices (flagged in "
                                                      "the report) instead of refusing it")

    cache = _Parser(prog=f"{PROG} cache", allow_abbrev=False,
                    description="Encode every slice of a datalist once into the embedding cache (resumable).",
                    epilog=f"example: {PROG} cache --datalist kvasir,brats --cache_dir cache --split training")
    cache.add_argument("datalist_pos", nargs="?", metavar="DATALIST", help="as --datalist")
    _add(cache, "datalist", metavar="NAMES", help="datalist names or JSON files, comma-separated")
    _add(cache, "base_dir", metavar="DIR", help="data folder (default: $AUTOMEDSAM_DATA or ../shared/data)")
    _add(cache, "cache_dir", default="cache", metavar="DIR", help="where the cache lives (default cache)")
    _add(cache, "backbone", default="lite_medsam", help="lite_medsam (default) or medsam_vit_b")
    _add(cache, "checkpoint", metavar="FILE", help="backbone checkpoint (default: the package's)")
    _add(cache, "max_cases", type=_whole("--max_cases"), metavar="N", help="only the first N cases of each split")
    _add(cache, "slice_step", type=_whole("--slice_step"), default=1, metavar="K", help="every K-th slice")
    _add(cache, "only_labelled_slices", action="store_true", help="skip slices without a class")
    _add(cache, "split", default="training", help="training, validation, test, unlabelled, comma-separated, or all")
    _add(cache, "num_views", type=_num_views, default=1, metavar="K",
         help="views per slice: 1 (default) the plain slice; K adds K-1 augmented views; or per dataset, "
              "e.g. totalseg=32,kvasir=12,default=4")
    _add(cache, "all_labelled_slices", action="store_true", help="with --slice_step: keep every slice holding a "
                                                                 "class too")
    _add(cache, "batch_size", type=_whole("--batch_size"), default=4, metavar="N", help="slices per encoder call")
    _add(cache, "rank", type=_whole("--rank"), metavar="R", help="this process's share (default: torch.distributed)")
    _add(cache, "world_size", type=_whole("--world_size"), metavar="W", help="number of processes sharing")
    _add(cache, "device", help="where the encoder runs (default: cuda:$LOCAL_RANK when there, else cpu)")

    demo = _Parser(prog=f"{PROG} demo", allow_abbrev=False,
                   description="Segment one case per domain with the shipped weights (the real data when it is "
                               "there, else a generated sample, and say which).")
    _add(demo, "output", default="outputs/demo", metavar="DIR", help="output folder (default outputs/demo)")
    _add(demo, "data_dir", metavar="DIR", help="the real data (default: $AUTOMEDSAM_DATA or ../shared/data)")
    _add(demo, "device", default="cpu", help="cpu, cuda or cuda:N")
    _add(demo, "overwrite", action=argparse.BooleanOptionalAction, default=True,
         help="replace earlier demo outputs (default: yes)")
    _add(demo, "quiet", action="store_true", help="no progress bars")
    return {"": top, "segment": seg, "cache": cache, "demo": demo, "add-class": _add_class_parser()}


def _colour(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        rgb = tuple(int(v) for v in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise argparse.ArgumentTypeError(f"--colour must be R,G,B with three whole numbers 0..255, got {text!r}")
    return rgb


def _snomed(text: str) -> tuple[str, str]:
    code, sep, meaning = text.partition(":")
    if not sep or not code.strip().isdigit() or not meaning.strip():
        raise argparse.ArgumentTypeError(f"--snomed must be CODE:MEANING (a SNOMED CT code, e.g. 69536005:Head), "
                                         f"got {text!r}")
    return code.strip(), meaning.strip()


def _positive(what: str, kind=float) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = _whole(what)(text) if kind is int else float(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{what} must be a {'whole ' if kind is int else ''}number > 0, "
                                             f"got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text!r}")
        return v

    return parse


ADD_CLASS_HELP = """\
Teach the model a new class from a few labelled images and write a new bundle (the source bundle
is not changed). The new class's images and masks are encoded into the embedding cache, then only
what the new class owns is trained, with slices of the other modalities as negatives; the old
classes answer as before, bit for bit (checked before writing). Resumable: run the same command
again after an interruption. Every option, the name and every image/mask pair are checked before
any work.
"""


def _add_class_parser() -> _Parser:
    ac = _Parser(prog=f"{PROG} add-class", description=ADD_CLASS_HELP, allow_abbrev=False,
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog=f"example: {PROG} add-class fetal_head --modality ultrasound --images imgs/ --masks masks/ "
                        f"--max_cases 20 --output my_bundle")
    ac.add_argument("name", nargs="?", metavar="NAME", help="the new class (lower case, '_' for spaces)")
    _add(ac, "modality", metavar="M", help="its modality (a vocabulary modality or a new one: min-max normalised)")
    _add(ac, "images", metavar="DIR", help="folder of images (with --masks; matched by file name)")
    _add(ac, "masks", metavar="DIR", help="folder of their masks (a.png <-> a.png or a_mask.png/a_seg.png)")
    _add(ac, "datalist", metavar="JSON", help="instead of --images/--masks: a Decathlon-style datalist "
                                              "('training' entries with image and label)")
    _add(ac, "data_dir", metavar="DIR", help="the datalist's base folder (default: $AUTOMEDSAM_DATA or ../shared/data)")
    _add(ac, "output", metavar="DIR", help="the new bundle's folder (must not exist, or hold an unfinished run)")
    _add(ac, "bundle", metavar="DIR", help="the source bundle (default: $AUTOMEDSAM_BUNDLE or bundles/automedsam)")
    _add(ac, "max_cases", type=_positive("--max_cases", int), metavar="N", help="teach from a seeded draw of N images")
    _add(ac, "aliases", metavar="A,B", help="other spellings of the class, comma-separated")
    _add(ac, "colour", type=_colour, metavar="R,G,B", help="overlay colour")
    _add(ac, "snomed", type=_snomed, metavar="CODE:MEANING",
         help="SNOMED CT concept for DICOM-SEG (default: Anatomical Structure)")
    _add(ac, "dataset", metavar="NAME", help="dataset name of the label rule written (default added_NAME)")
    _add(ac, "steps", type=_positive("--steps", int), default=100, metavar="N", help="training steps (default 100)")
    _add(ac, "batch_size", type=_positive("--batch_size", int), default=4, metavar="N", help="default 4")
    _add(ac, "learning_rate", type=_positive("--learning_rate"), default=0.1, metavar="F", help="default 0.1")
    _add(ac, "num_views", type=_positive("--num_views", int), default=1, metavar="K",
         help="views per new image: the plain one and K-1 augmented ones (default 1)")
    _add(ac, "class_head", action=argparse.BooleanOptionalAction, default=None,
         help="give the class its own copy of the class prompt encoder's class-dependent parts, trained with "
              "its row (default: add_class's)")
    _add(ac, "head_learning_rate", type=_positive("--head_learning_rate"), metavar="F",
         help="learning rate of the class head (default: add_class's)")
    _add(ac, "cache_dir", metavar="DIR", help="the embedding cache (default: $AUTOMEDSAM_CACHE or cache)")
    _add(ac, "device", default="cpu", metavar="cpu|cuda|cuda:N", help="where it runs (default cpu)")
    _add(ac, "seed", type=_whole("--seed"), default=0, metavar="S", help="draw and training seed (default 0)")
    _add(ac, "quiet", action="store_true", help="no progress bars")
    return ac


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _bool_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--overwrite=true`` / ``--quiet=False`` (which fire took) -> the bare flag, or nothing."""
    flags = {s for a in parser._actions if isinstance(a, argparse._StoreTrueAction) for s in a.option_strings}
    out = []
    for a in argv:
        name, eq, value = a.partition("=")
        if eq and name in flags and value.lower() in _BOOL_WORDS:
            if _BOOL_WORDS[value.lower()]:
                out.append(name)
            continue
        out.append(a)
    return out


def _parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    """Parse intermixed options and inputs; anything unknown is refused, naming it."""
    ns, extra = parser.parse_known_intermixed_args(_bool_values(argv, parser))
    if extra:
        bad = extra[0]
        known = [s for a in parser._actions for s in a.option_strings]
        if bad.startswith("--"):
            near = difflib.get_close_matches(bad.split("=")[0], known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise _UsageError(f"unknown option {bad}{hint} (see: {parser.prog} --help)")
        if bad.startswith("-"):
            raise _UsageError(f"unknown option {bad}; a file name starting with '-' must be written ./{bad} "
                              f"(see: {parser.prog} --help)")
        raise _UsageError(f"unexpected argument {bad!r} (see: {parser.prog} --help)")
    return ns


# --------------------------------------------------------------------------------------------
# the commands


def _err(message: str) -> None:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr, flush=True)


def run_segment(ns: argparse.Namespace) -> int:
    from .options import segment_options
    from .segment import segment

    if not ns.inputs:
        raise _UsageError(f"no INPUT given ({PROG} segment INPUT [INPUT ...] --output DIR)")
    if not ns.output:
        raise _UsageError("no output folder given (--output DIR)")
    opts = segment_options(classes=ns.classes, modality=ns.modality, device=ns.device, weights=ns.weights,
                           bundle=ns.bundle, largest_component=ns.largest_component, uncertainty=ns.uncertainty,
                           box=ns.box, point=ns.point, overwrite=ns.overwrite, progress=not ns.quiet,
                           threshold=ns.threshold, batch_size=ns.batch_size, max_voxels=ns.max_voxels,
                           series_uid=ns.series_uid, allow_gaps=ns.allow_gaps)

    def warn(msg):
        print(f"{PROG}: warning: {one_line(msg)}", file=sys.stderr, flush=True)

    def on_result(entry):
        if not entry["ok"]:
            _err(entry["error"])
        elif not ns.quiet:
            rep = entry["report"] or {}
            found = ", ".join(rep.get("classes_found") or []) or "no class found"
            print(f"{entry['input']}: {rep.get('modality')}, {found} -> {entry['outputs'].get('seg')}",
                  file=sys.stderr, flush=True)

    results = segment(ns.inputs, ns.output, options=opts, on_error="skip", warn=warn, on_result=on_result)
    failed = sum(not r["ok"] for r in results)
    if failed and len(results) > 1:
        if failed == len(results):
            print(f"{PROG}: all {failed} inputs failed; nothing was segmented", file=sys.stderr)
        else:
            print(f"{PROG}: {failed} of {len(results)} inputs failed and were skipped; the other "
                  f"{len(results) - failed} were segmented", file=sys.stderr)
    return 1 if failed else 0


def run_cache(ns: argparse.Namespace) -> int:
    from .data.cache import build_cache

    if ns.datalist and ns.datalist_pos and ns.datalist != ns.datalist_pos:
        raise _UsageError(f"two datalists given ({ns.datalist_pos!r} and --datalist {ns.datalist!r})")
    datalist = ns.datalist or ns.datalist_pos
    if not datalist:
        raise _UsageError("no datalist given (--datalist NAMES)")
    from .data.cache import CacheError
    from .errors import RunError

    try:
        stats = build_cache(datalist, base_dir=ns.base_dir, cache_dir=ns.cache_dir, backbone=ns.backbone,
                            checkpoint=ns.checkpoint, max_cases=ns.max_cases, slice_step=ns.slice_step,
                            only_labelled_slices=ns.only_labelled_slices, split=ns.split, batch_size=ns.batch_size,
                            rank=ns.rank, world_size=ns.world_size, device=ns.device, num_views=ns.num_views,
                            all_labelled_slices=ns.all_labelled_slices)
    except CacheError as e:
        raise RunError(e) from None
    print(json.dumps(stats, default=str))
    return 0


def run_demo(ns: argparse.Namespace) -> int:
    from .demo import demo  # demo imports segment, never cli

    demo(output=ns.output, data_dir=ns.data_dir, device=ns.device, overwrite=ns.overwrite, quiet=ns.quiet)
    return 0


def run_add_class(ns: argparse.Namespace) -> int:
    from .adapt import AddClassError, add_class

    if not ns.name:
        raise _UsageError(f"no class NAME given ({PROG} add-class NAME --modality M ... --output DIR)")
    if not ns.modality:
        raise _UsageError("no modality given (--modality M, e.g. ultrasound)")
    if not ns.output:
        raise _UsageError("no output folder given (--output DIR)")
    folders = ns.images is not None or ns.masks is not None
    if folders and ns.datalist is not None:
        raise _UsageError("give either --images and --masks, or --datalist, not both")
    if not folders and ns.datalist is None:
        raise _UsageError("no training data given (--images DIR --masks DIR, or --datalist JSON)")
    if folders and (ns.images is None or ns.masks is None):
        raise _UsageError("--images needs --masks (and --masks needs --images)")
    if ns.data_dir is not None and ns.datalist is None:
        raise _UsageError("--data_dir goes with --datalist")
    if not ns.device.startswith("cuda") and ns.device != "cpu":
        raise _UsageError(f"--device must be cpu, cuda or cuda:N, got {ns.device!r}")
    aliases = [a.strip() for a in (ns.aliases or "").split(",") if a.strip()]
    head = {k: getattr(ns, k) for k in ("class_head", "head_learning_rate") if getattr(ns, k) is not None}
    try:
        add_class(ns.name, ns.modality, images=ns.images, masks=ns.masks, output=ns.output, datalist=ns.datalist,
                  data_dir=ns.data_dir, bundle=ns.bundle, max_cases=ns.max_cases, aliases=aliases, colour=ns.colour,
                  snomed=ns.snomed, dataset=ns.dataset, steps=ns.steps, batch_size=ns.batch_size,
                  learning_rate=ns.learning_rate, cache_dir=ns.cache_dir, num_views=ns.num_views, device=ns.device,
                  seed=ns.seed, progress=not ns.quiet, **head,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    except AddClassError as e:
        _err(str(e))
        return 2
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"segment": run_segment, "cache": run_cache,
                                                            "demo": run_demo, "add-class": run_add_class}


def _quiet_third_party() -> None:
    """Warnings of libraries that say nothing to a user of this command (every command)."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # GPU DICOM decoder absent
    warnings.filterwarnings("ignore", message=".*timm.*")  # timm's deprecated import paths, used by MedSAM
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    parsers = build_parser()
    try:
        if not args or args[0] in ("-h", "--help"):
            parsers[""].print_help()
            return 0 if args else 2
        command = args[0]
        if command not in COMMANDS:
            near = difflib.get_close_matches(command, list(COMMANDS), n=1)
            raise _UsageError(f"unknown command {command!r}" + (f" (did you mean {near[0]}?)" if near else "")
                              + f"; commands: {', '.join(COMMANDS)}")
        if any(a in ("-h", "--help") for a in args[1:]):
            parsers[command].print_help()
            return 0
        ns = _parse(parsers[command], args[1:])
        with warnings.catch_warnings():
            _quiet_third_party()
            return COMMANDS[command](ns)
    except _UsageError as e:
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except AutoMedSAMError as e:
        _err(str(e))
        return 2
    except (ValueError, OSError) as e:  # e.g. a datalist or cache folder the cache command cannot use
        _err(one_line(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
