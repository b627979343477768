"""Restore JPEG images with a trained checkpoint, or the network that ships: tiled, memory-bounded inference.

    python -m restorer restore photo.jpg                   the shipped network, into ./restored/
    python -m restorer restore [--ckpt FILE | --model NAME] photos/ img.jpg [--out restored/] \
        [--quality N] [--force] [--tile N] [--overlap 32] [--batch N] [--device auto|cpu|cuda]
        [--precision fp32|bf16] [--compare] [--reference DIR] [--no-file-bounds]

--ckpt is a checkpoint (best.pt, last.pt), a network exported as .onnx or .safetensors (restorer.tools.export),
or the name of a network that ships;
--model NAME one of the networks that ship with restorer (restorer.infer.shipped); neither: the default one.

Inputs are files or folders (folders are walked recursively for jpg/jpeg/png/webp/bmp/tif/tiff,
any case). Each input is written as ``OUT/<stem>.png`` (lossless). Grayscale files stay grayscale.
Unreadable files are reported as ``skipped X: reason`` and the run goes on. A file whose restored
image is not finite (NaN or inf: damaged weights) is not written: ``failed X: reason``, exit 1.

The quality of each input (restorer.data.jpeg): its JPEG quantization tables' IJG quality; for a
file without usable tables (a PNG of a once-JPEG image, a video frame) the quality seen in its
pixels, said in one line. A network conditioned on the quality is given it; ``--quality N``
overrides it for every file (lower removes more, higher keeps more detail).

Never silently worse: a network restores the qualities it was trained on (its card says which). A
file outside them (a q10 network and a q90 photo), or with no JPEG trace at all, is written
unchanged, with one line saying so; ``--force`` restores it anyway. The last line counts them.

The file's bounds: a JPEG file says in which quantization bin each 8x8 block's DCT coefficient of
the original lay. The network's output is moved to the nearest image inside those bins before it is
written (restorer.data.jpeg.FileBounds): never further from the original than the network's output,
and at high qualities it keeps the detail a network would smooth away. Not with ``--quality`` (a
file re-saved from a worse JPEG holds that JPEG's artifacts inside its own bins) or
``--no-file-bounds``, and not for files without tables.

Tiling: see restorer.infer.inference (the tiles, their blending, the memory bound).

Compare picture (``--compare``): restorer.infer.pictures.make_compare (JPEG input | restored | original,
labelled with PSNR, and a 4x zoom of the crop that changed most).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from restorer.base.cli import Parser, UsageError, one_line, run, said_as_option
from restorer.data import jpeg
from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError
from restorer.base.fileio import atomic_open, file_identity
from restorer.base.errors import RestorerError
from restorer.infer.pictures import make_compare
from restorer.infer.shipped import add_network_options, chosen_network
from restorer.base.device import INFERENCE_PRECISIONS, resolve_device
from restorer.infer.inference import (Network, NonFiniteOutputError, TilingError, check_tiling, decode_file,
                                      find_inputs, input_quality, load_network, read_image, restore_image, warm_up)

PROG = "restorer restore"

# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def plan_outputs(files: list[Path], out_dir: Path, compare: bool) -> tuple[dict[Path, tuple[Path, Path]], dict[Path, str]]:
    """Where each input's results go (OUT/<stem>.png, OUT/<stem>_compare.png), and the inputs that
    cannot be restored with a reason: an output that would overwrite an input file (restore
    dir/a.png --out dir), or one another input already claimed (a.jpg and a.png; x_compare.png as an
    input beside x.jpg with --compare)."""
    inputs = {file_identity(f): f for f in files}  # a symlink or a hard link to an input is that input
    claimed: dict = {}
    plan, problems = {}, {}
    for f in files:
        outputs = (out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_compare.png")
        wanted = outputs if compare else outputs[:1]
        clash = next((o for o in wanted if file_identity(o) in inputs), None)
        if clash is not None:
            problems[f] = f"its output {clash} would overwrite the input {inputs[file_identity(clash)]}: use another --out"
        elif taken := next((o for o in wanted if file_identity(o) in claimed), None):
            problems[f] = f"{taken.name} is already the output of {claimed[file_identity(taken)]}"
        else:
            plan[f] = outputs
            claimed.update({file_identity(o): f for o in wanted})
    return plan, problems


def find_reference(ref_dir: Path, stem: str) -> Path | None:
    for f in sorted(ref_dir.iterdir()):
        if f.is_file() and f.stem == stem and f.suffix.lower() in IMAGE_EXTENSIONS:
            return f
    return None


OUT_DEFAULT = "restored"

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> Parser:
    p = Parser(prog=PROG, description="Remove JPEG artifacts with a trained network.")
    add_network_options(p, "checkpoint (best.pt / last.pt), or an exported .onnx or .safetensors")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (walked recursively)")
    p.add_argument("--out", default=OUT_DEFAULT, help="output folder: OUT/<stem>.png (default: ./restored)")
    p.add_argument("--tile", type=int, help="tile size in px, a multiple of 8 (default 256 on the CPU, 1024 on CUDA)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in px, at most tile/2 (default 32)")
    p.add_argument("--batch", type=int, help="tiles per forward pass (default 8 on the CPU, 4 on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=INFERENCE_PRECISIONS, help="fp32 (default, as evaluate) or bf16")
    p.add_argument("--quality", type=int, help="the JPEG quality to restore every input as (1-100), instead of "
                   "each file's own: lower removes more, higher keeps more detail")
    p.add_argument("--no-file-bounds", dest="file_bounds", action="store_false", help="do not move the output "
                   "inside the quantization bins of its JPEG file (done by default, except with --quality: a file "
                   "re-saved from a worse JPEG holds that JPEG's artifacts inside its own bins)")
    p.add_argument("--force", action="store_true", help="also restore files outside the qualities the network was "
                   "trained on (written unchanged otherwise)")
    p.add_argument("--compare", action="store_true", help="also write OUT/<stem>_compare.png")
    p.add_argument("--reference", help="folder of originals (same stem) for --compare and PSNR")
    return p


def _checked(args) -> tuple[Network, list[Path], list[str]]:
    """The command's mistakes, before any work (UsageError, one line): the network, the inputs and
    the paths given that do not exist. Sets the device's tile and batch defaults."""
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"  # bigger tiles and batches: fewer, fuller launches
    args.tile = args.tile if args.tile is not None else (1024 if cuda else 256)
    args.batch = args.batch if args.batch is not None else (4 if cuda else 8)
    try:
        check_tiling(args.tile, args.overlap, args.batch)
    except TilingError as e:  # the library's words, with the flag
        raise said_as_option(e) from None
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {args.quality}")
    if args.reference and not Path(args.reference).is_dir():
        raise UsageError(f"--reference folder not found: {args.reference}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out is not a folder: {out_dir}" + ("" if args.out != OUT_DEFAULT else " (the default ./restored)"))
    source = chosen_network(args)
    if not Path(source).is_file():
        raise UsageError(f"checkpoint not found: {source}")
    files, missing = find_inputs(args.inputs, exclude=out_dir)
    if not files:
        raise UsageError(f"no input images found in: {' '.join(args.inputs)}")
    return load_network(source, device, args.precision), files, missing


@dataclass
class Tally:
    restored: int = 0
    unchanged: int = 0  # outside the network's qualities: written as they are
    estimated: int = 0  # restored with the quality their pixels show
    skipped: int = 0
    failed: int = 0  # the network's output was not finite: not written

    def line(self, trained: Optional[tuple[int, int]], out_dir: Path) -> str:
        return (f"restored {self.restored}"
                + (f" ({self.estimated} with the quality estimated from the pixels)" if self.estimated else "")
                + f", unchanged {self.unchanged}"
                + (f" (outside the network's qualities {trained[0]}-{trained[1]}, or no JPEG trace; --force restores "
                   "them)" if self.unchanged else "")
                + f", skipped {self.skipped}" + (f", failed {self.failed}" if self.failed else "")
                + f", output dir {out_dir}")


def restore_file(network: Network, path: Path, outputs: tuple[Path, Path], args, tally: Tally, say) -> None:
    """One input: its quality, the guard, the restoration, the compare picture. What is said of the
    file is one line (`say`); a file that cannot be read or written is skipped."""
    try:
        data = path.read_bytes()
        image, _ = decode_file(data)
    except (ImageDecodeError, OSError) as e:
        say(f"skipped {path}: {one_line(e)}")
        tally.skipped += 1
        return
    quality, how = (args.quality, "given") if args.quality is not None else input_quality(data, image)
    trained = network.trained_qualities
    notes = []
    if how == "pixels":
        tally.estimated += 1
        notes.append(f"no usable JPEG tables: quality {quality} estimated from the pixels")
    reason = outside(quality, how, trained) if not args.force else None
    try:
        if reason is not None:
            say(f"{path}: " + "; ".join([*notes, f"{reason}: written unchanged (--force restores it anyway)"]))
            save_png(outputs[0], image)
            tally.unchanged += 1
            return
        if quality is None and network.takes_quality:  # no JPEG trace, and --force
            quality = trained[1] if trained else 95
            notes.append(f"no JPEG trace: restored as quality {quality}, the gentlest the network knows")
        if notes:
            say(f"{path}: " + "; ".join(notes))
        # The file's bounds hold the image its last encoder saw; --quality says that is not the whole story.
        bounds = jpeg.file_bounds(data) if args.file_bounds and how == "tables" else None
        result = restore_image(network, image, quality=quality if network.takes_quality else None, bounds=bounds,
                               tile=args.tile, overlap=args.overlap, batch=args.batch)
        save_png(outputs[0], result)
    except NonFiniteOutputError as e:  # the network failed, not the file: the run ends with exit 1
        say(f"failed {path}: {e}")
        tally.failed += 1
        return
    except (RestorerError, OSError, RuntimeError, torch.OutOfMemoryError) as e:  # unwritable output, memory
        say(f"skipped {path}: {one_line(e)}")
        tally.skipped += 1
        return
    tally.restored += 1
    if args.compare:
        try:
            original = _reference(path, image, Path(args.reference) if args.reference else None, say)
            pic = make_compare(image, result, original)
            with atomic_open(outputs[1], "wb") as f:
                pic.save(f, format="PNG")
        except (RestorerError, OSError, RuntimeError) as e:
            say(f"note {path}: no compare picture ({one_line(e)})")


def _reference(path: Path, image: np.ndarray, ref_dir: Optional[Path], say) -> Optional[np.ndarray]:
    """The original of `path` for the compare picture (--reference), in the input's colour type; None
    when there is none, or it is unreadable or of another size (said)."""
    ref = find_reference(ref_dir, path.stem) if ref_dir is not None else None
    if ref is None:
        return None
    try:
        original, _ = read_image(ref)
    except (ImageDecodeError, OSError) as e:
        say(f"note {path}: reference {ref} unreadable ({one_line(e)})")
        return None
    if original.ndim != image.ndim:  # match the input's colour type
        original = np.asarray(Image.fromarray(original).convert("L" if image.ndim == 2 else "RGB"))
    if original.shape != image.shape:
        say(f"note {path}: reference {ref} is {original.shape[1]}x{original.shape[0]}, not "
            f"{image.shape[1]}x{image.shape[0]}: compared without it")
        return None
    return original


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        from tqdm import tqdm

        args = _parser().parse_args(argv)
        network, files, missing = _checked(args)
        if network.device.type == "cuda":  # one tile shape throughout: let cuDNN pick its fastest kernels once
            torch.backends.cudnn.benchmark = True
            warm_up(network, args.tile, args.batch)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        tally = Tally(skipped=len(missing))
        for m in missing:
            print(f"skipped {m}: no such file or folder", file=sys.stderr)
        plan, problems = plan_outputs(files, out_dir, args.compare)
        say = lambda text: tqdm.write(text, file=sys.stderr)  # noqa: E731
        for path in tqdm(files, desc="restore", unit="img", file=sys.stderr, disable=None):
            if path in problems:
                say(f"skipped {path}: {problems[path]}")
                tally.skipped += 1
            else:
                restore_file(network, path, plan[path], args, tally, say)
        print(tally.line(network.trained_qualities, out_dir))
        return 1 if tally.failed or tally.restored + tally.unchanged == 0 else 0

    return run(PROG, body)


def outside(quality: Optional[int], how: str, trained: Optional[tuple[int, int]]) -> Optional[str]:
    """Why a file must not go through a network trained on the qualities `trained` (None: it may)."""
    if trained is None:  # an exported file without a card: nothing to compare with
        return None
    lo, hi = trained
    if quality is None:
        return (f"no usable JPEG tables and no JPEG trace in its pixels (never compressed, or resized since); "
                f"the network restores JPEG qualities {lo}-{hi}")
    if not lo <= quality <= hi:
        said = {"tables": f"its JPEG tables say quality {quality}", "pixels": "that is",
                "given": f"--quality says {quality}"}[how]
        return f"{said}, outside the qualities the network was trained on ({lo}-{hi})"
    return None


if __name__ == "__main__":
    sys.exit(main())
