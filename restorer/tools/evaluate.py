"""Evaluate a network the way the JPEG-restoration papers do: PSNR, SSIM and PSNR-B of the JPEG input
and of the network's output, on full images, for qualities 10 20 30 40 in one table.

    python -m restorer evaluate [--ckpt CKPT | --model NAME] --images DIR [--quality 10 20 30 40 | --sweep]
                                [--chroma 420|422|444] [--double Q1] [--gray | --y-channel]
                                [--json FILE] [--plot FILE.png] [--device auto|cpu|cuda]
                                [--precision fp32|bf16] [--tile N] [--max-side N] [--no-file-bounds]
    python -m restorer evaluate [--ckpt CKPT | --model NAME] --inputs JPEG_DIR --references DIR [--json FILE]
                                [--no-file-bounds]

CKPT is a checkpoint (EMA weights when present) or a network exported as .onnx or .safetensors;
--model NAME instead scores a network that ships with restorer (restorer.infer.shipped); neither: the default one.

The protocol (the papers': ARCNN, DnCNN, QGAC, FBCNN, SwinIR; KAIR's and FBCNN's test scripts)
-------------------------------------------------------------------------------------------
For every image under DIR (recursive; .jpg .jpeg .png .webp .bmp .tif .tiff, any case) and quality:

* colour (the default): the image as RGB, whole (no crop), JPEG-encoded by Pillow's libjpeg-turbo
  with the standard tables and 4:2:0 chroma, decoded; metrics on R, G and B (data range 1), as the
  colour tables of QGAC and FBCNN report. ``--y-channel`` measures on Y instead (below).
* ``--gray`` (the LIVE1 / Classic5 / BSDS500 grayscale tables): the reference is a colour image's Y
  in the MATLAB ``rgb2ycbcr`` convention, Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G,
  B in [0, 1] x 255, rounded to 8 bits (16-235), or a grayscale file's own values (Classic5 is
  grayscale); that one channel is JPEG-encoded as a grayscale JPEG. A grayscale network restores it;
  an RGB network gets it as three equal channels and its output's mean over them. Metrics on it.
* a grayscale network without ``--gray``: the reference is the luma it trains on (JFIF BT.601, full
  range: Pillow's L, restorer.base.colour.luma), JPEG-encoded as a grayscale JPEG. Metrics on it.
* the network runs on the whole image: in tiles of 1024 px (so memory stays bounded), which the
  benchmarks' images (LIVE1, Classic5, BSDS500) fit in whole, on every device alike; as restore
  does, the output is moved inside the quantization bins of the JPEG it restores (the file's bounds,
  restorer.data.jpeg.FileBounds; ``--no-file-bounds`` scores the network alone), then rounded to 8
  bits as a saved image would be. A network conditioned on the quality is given the one
  the JPEG's tables say, as restore reads it from a file; there is no guard: a network is scored at
  every quality asked, inside its training range or not;
* PSNR, SSIM (Gaussian 11x11, sigma 1.5) and PSNR-B (Yim & Bovik 2011) per image, then the mean
  over images (restorer.infer.metrics). An image under 11 px a side (after ``--max-side`` and ``--double``'s
  cut) has no SSIM: it is skipped, with one warning that counts them. A network whose output is not
  finite (NaN or inf) ends the evaluation (exit 1): nothing is scored from it.

The published JPEG-input figures this reproduces (the input row does not depend on the network):
LIVE1 gray q10 27.77 dB PSNR (q20 30.07, q30 31.41, q40 32.35), Classic5 gray q10 27.82 dB.

Beyond the papers, the JPEGs people have: ``--sweep`` is qualities 10 20 ... 90 and 95; ``--chroma``
sets the subsampling of colour JPEGs (phones and cameras often save 4:4:4); ``--double Q1`` first
compresses each image at Q1, shifts the block grid by 1-7 px each way (fixed per image), then
compresses it at the quality under test (a photo cropped or re-saved after its first JPEG); the
reference is cut by the same shift.

``--inputs DIR --references DIR`` scores JPEG files as they are (no encoding): each input is
matched with the reference of the same file stem (relative path without extension); a grayscale
input is scored against the reference's MATLAB Y (or the reference itself when it is grayscale).
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from restorer.base.cli import Parser, UsageError, run, said_as_option, warn
from restorer.base.errors import FieldError, one_line
from restorer.data import jpeg
from restorer.data.decode import IMAGE_EXTENSIONS, ImageDecodeError
from restorer.base.colour import luma, matlab_y, matlab_y_u8
from restorer.base.fileio import atomic_open, atomic_write_json
from restorer.base.device import INFERENCE_PRECISIONS
from restorer.infer.inference import (Network, NonFiniteOutputError, TilingError, check_tiling, decode_file,
                                      find_inputs, input_quality, load_network, restore_image)
from restorer.infer.metrics import psnr, psnr_b, ssim
from restorer.infer.shipped import add_network_options, chosen_network

PROG = "restorer evaluate"

METRICS = ("psnr", "ssim", "psnrb")
KEYS = tuple(f"{m}_{s}" for m in METRICS for s in ("jpeg", "model"))
QUALITIES = (10, 20, 30, 40)
SWEEP = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
TILE = 1024  # on every device: the same tiles give the same figures
SSIM_WINDOW = 11  # the Gaussian window of SSIM (restorer.infer.metrics.ssim): the smallest side that can be scored
MAX_SHIFT = 7  # --double cuts 1..MAX_SHIFT px from the top and the left of each image
GIVEN = "given"  # the "quality" key of --inputs/--references results
FLAGS = {"qualities": "--quality", "y_channel": "--y-channel", "max_side": "--max-side"}  # Protocol fields not --FIELD

HEADERS = {
    "rgb": "metrics on RGB (all three channels, data range 1.0)",
    "y": "metrics on Y (MATLAB rgb2ycbcr: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, data range 1.0)",
    "gray": "grayscale protocol: reference = MATLAB rgb2ycbcr Y rounded to 8 bits, one-channel JPEG; metrics on it",
    "luma": "a grayscale network: reference = the luma it trains on (JFIF BT.601, Pillow's L), one-channel JPEG; "
            "metrics on it (--gray: the papers' MATLAB Y instead)",
}


# ---------------------------------------------------------------------------------------------
# pieces


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 / float in [0, 255] -> 1 x C x H x W float32 in [0, 1] (float32
    agrees with float64 to within 1e-4 dB and 1e-5 SSIM here, at a fraction of the time)."""
    t = torch.from_numpy(np.asarray(arr, dtype=np.float32) / np.float32(255.0))
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1))[None]


def measure(x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = _tensor(x), _tensor(ref)
    return {"psnr": float(psnr(a, b)[0]), "ssim": float(ssim(a, b, window_size=SSIM_WINDOW)[0]),
            "psnrb": float(psnr_b(a, b)[0])}


def scored(channel: str, clean: np.ndarray, jpeg: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """The six figures of one image; `channel` y measures RGB images on MATLAB Y."""
    if channel == "y" and clean.ndim == 3:
        clean, jpeg, out = matlab_y(clean), matlab_y(jpeg), matlab_y(out)
    mj, mm = measure(jpeg, clean), measure(out, clean)
    return {f"{m}_{s}": v[m] for m in METRICS for s, v in (("jpeg", mj), ("model", mm))}


def centre_crop(rgb: np.ndarray, max_side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(rgb[top:top + ch, left:left + cw])


# ---------------------------------------------------------------------------------------------
# library entry points


def double_shift(name: str) -> tuple[int, int]:
    """The grid shift of --double for an image: 1-7 px each way, fixed by its name."""
    h = zlib.crc32(name.encode())
    return 1 + h % MAX_SHIFT, 1 + (h // MAX_SHIFT) % MAX_SHIFT


class ProtocolError(FieldError):
    """A protocol that cannot be measured; `field` names the Protocol field."""


@dataclass(frozen=True)
class Protocol:
    """What evaluate measures: each image JPEG-encoded at `qualities` (with `chroma` subsampling; first
    at quality `double` with the block grid shifted, when given), scored in RGB, on MATLAB Y
    (`y_channel`), or by the grayscale benchmarks' protocol (`gray`); images centre-cropped to
    `max_side` (0: whole); the network's output moved inside the JPEG file's bins (`file_bounds`, as
    restore does) or scored alone."""

    qualities: tuple[int, ...] = QUALITIES
    gray: bool = False
    y_channel: bool = False
    chroma: str = "420"
    double: Optional[int] = None
    max_side: int = 0
    file_bounds: bool = True

    def check(self) -> "Protocol":
        """The protocol with its qualities in order and once each; ProtocolError (one line) otherwise."""
        qualities = tuple(dict.fromkeys(int(q) for q in self.qualities))
        if not qualities or not all(1 <= q <= 100 for q in qualities):
            raise ProtocolError("qualities", f"must be in 1..100, got {list(qualities)}")
        if self.double is not None and not 1 <= self.double <= 100:
            raise ProtocolError("double", f"must be a quality in 1..100, got {self.double}")
        if self.chroma not in jpeg.CHROMA:
            raise ProtocolError("chroma", f"must be one of {', '.join(jpeg.CHROMA)}, got {self.chroma!r}")
        if self.gray and self.y_channel:
            raise ProtocolError("y_channel", "the grayscale protocol already measures on Y")
        smallest = SSIM_WINDOW + (MAX_SHIFT if self.double is not None else 0)
        if self.max_side and self.max_side < smallest:
            cut = f", and the up to {MAX_SHIFT} px a double JPEG cuts" if self.double is not None else ""
            raise ProtocolError("max_side", f"must be >= {smallest} (SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window{cut}) "
                                f"or 0 for whole images, got {self.max_side}")
        return dataclasses.replace(self, qualities=qualities)

    def channel(self, grayscale_network: bool) -> str:
        """What the figures are measured on (HEADERS)."""
        return "gray" if self.gray else "luma" if grayscale_network else "y" if self.y_channel else "rgb"


@dataclass(frozen=True)
class Runtime:
    """How the network runs: not what is measured (the same figures on every device and tile size)."""

    device: str = "auto"
    precision: str = "fp32"
    tile: Optional[int] = None
    progress: bool = False  # a progress bar on stderr


@dataclass
class Skipped:
    """The images evaluate could not score, and the references that are JPEGs of a quality scored."""

    unreadable: int = 0
    too_small: list[str] = field(default_factory=list)  # under SSIM's window once cropped and cut
    lossy_references: list[str] = field(default_factory=list)


def evaluate(network, images_dir, protocol: Protocol = Protocol(), runtime: Runtime = Runtime()) -> dict:
    """Encode every image under `images_dir` by the protocol, restore it with the network (a path, or
    a Network), score both (module docstring). Returns {"checkpoint", "channel", "chroma", "double",
    "qualities": {q: {"images": {name: figures}, "mean"}}}."""
    protocol, tiling = protocol.check(), _tiling(runtime.tile)
    root = Path(images_dir)
    paths = _image_files(root, "--images")
    net = _load(network, runtime.device, runtime.precision)
    channel = protocol.channel(net.grayscale)
    if protocol.y_channel and net.grayscale:
        warn("a grayscale network is scored on its luma anyway: --y-channel changes nothing")
    per_q: dict[str, dict[str, dict[str, float]]] = {str(q): {} for q in protocol.qualities}
    skipped = Skipped()
    from tqdm import tqdm

    with tqdm(total=len(paths), desc="evaluate", unit="image", file=sys.stderr, disable=not runtime.progress or None,
              leave=False) as bar:
        for path in paths:
            name = path.relative_to(root).as_posix()
            for q, figures in score_image(net, path, name, protocol, channel, tiling, skipped).items():
                per_q[str(q)][name] = figures
            bar.update()
    if not any(per_q.values()):
        raise UsageError(f"none of the {len(paths)} image(s) under {root} could be scored ({skipped.unreadable} "
                         f"unreadable, {len(skipped.too_small)} under {SSIM_WINDOW} px a side)")
    _warn_too_small(skipped.too_small)
    if skipped.lossy_references:
        warn(f"{len(skipped.lossy_references)} reference(s) are JPEGs themselves, of a quality scored here: "
             f"{_some(skipped.lossy_references)}; at or above its own quality a score measures how well the network "
             "keeps the reference's artifacts")
    return _result(network, channel, per_q, chroma=protocol.chroma, double=protocol.double,
                   file_bounds=protocol.file_bounds)


def reference(image: np.ndarray, is_gray: bool, channel: str) -> np.ndarray:
    """The clean image scored against: a grayscale file's own values or a colour one's MATLAB Y (the
    grayscale protocol), the luma a grayscale network trains on, or RGB."""
    if channel == "gray":
        return image if is_gray else matlab_y_u8(image)
    if channel == "luma":
        return image if is_gray else luma(image)
    return np.repeat(image[..., None], 3, axis=2) if is_gray else image


def score_image(net: Network, path: Path, name: str, protocol: Protocol, channel: str, tiling: dict,
                skipped: Skipped) -> dict[int, dict[str, float]]:
    """One image's figures at each quality ({} when it cannot be scored: counted in `skipped`);
    `tiling`: restore_image's tile, overlap and batch."""
    try:
        raw = path.read_bytes()
        image, is_gray = decode_file(raw)
        own = jpeg.file_quality(raw)
    except (ImageDecodeError, OSError) as e:
        warn(f"skipping {name}: {one_line(e)}")
        skipped.unreadable += 1
        return {}
    clean = reference(centre_crop(image, protocol.max_side) if protocol.max_side else image, is_gray, channel)
    shift = double_shift(name) if protocol.double is not None else (0, 0)
    h, w = clean.shape[0] - shift[0], clean.shape[1] - shift[1]  # the size scored
    if min(h, w) < SSIM_WINDOW:
        skipped.too_small.append(f"{name} ({max(w, 0)}x{max(h, 0)})")
        return {}
    if own is not None and max(protocol.qualities) >= own:
        skipped.lossy_references.append(f"{name} (q{own})")
    figures = {}
    for q in protocol.qualities:
        data, ref = jpeg.compress(clean[..., None] if clean.ndim == 2 else clean, q, protocol.chroma,
                                  first=protocol.double, shift=shift)
        ref = ref[..., 0] if clean.ndim == 2 else ref
        pixels, tables_q = jpeg.decode(data)
        pixels = pixels[..., 0] if clean.ndim == 2 else pixels
        out = _restored(net, pixels, f"{name} at quality {q}", quality=tables_q,
                        bounds=jpeg.file_bounds(data) if protocol.file_bounds else None, **tiling)
        figures[q] = scored(channel, ref, pixels, out)
    return figures


def evaluate_pairs(ckpt_path, inputs_dir, references_dir, *, y_channel: bool = False, file_bounds: bool = True,
                   runtime: Runtime = Runtime()) -> dict:
    """Score JPEG files as they are against references matched by stem; the quality key is 'given'.
    Each input's quality (for a conditioned network) is its tables', or what its pixels show."""
    inputs, refs = Path(inputs_dir), Path(references_dir)
    paths = _image_files(inputs, "--inputs")
    references = {p.relative_to(refs).with_suffix("").as_posix(): p for p in _image_files(refs, "--references")}
    net = _load(ckpt_path, runtime.device, runtime.precision)
    kw = _tiling(runtime.tile)
    images: dict[str, dict[str, float]] = {}
    gray_inputs = 0
    too_small: list[str] = []
    for path in paths:
        stem = path.relative_to(inputs).with_suffix("").as_posix()
        if stem not in references:
            warn(f"skipping {stem}: no reference with that name under {refs}")
            continue
        try:
            data = path.read_bytes()
            jpeg_pixels, is_gray = decode_file(data)
            ref, ref_gray = decode_file(references[stem].read_bytes())
        except (ImageDecodeError, OSError) as e:
            warn(f"skipping {stem}: {one_line(e)}")
            continue
        if is_gray and not ref_gray:
            ref = matlab_y_u8(ref)
        elif ref_gray and not is_gray:
            ref = np.repeat(ref[..., None], 3, axis=2)
        if ref.shape != jpeg_pixels.shape:
            warn(f"skipping {stem}: the input is {jpeg_pixels.shape[1]}x{jpeg_pixels.shape[0]}, its reference "
                 f"{ref.shape[1]}x{ref.shape[0]}")
            continue
        if min(ref.shape[:2]) < SSIM_WINDOW:
            too_small.append(f"{stem} ({ref.shape[1]}x{ref.shape[0]})")
            continue
        gray_inputs += is_gray
        quality = input_quality(data, jpeg_pixels)[0] if net.takes_quality else None
        if net.takes_quality and quality is None:
            warn(f"{stem}: no JPEG trace in its pixels: restored as quality 95")
            quality = 95
        out = _restored(net, jpeg_pixels, stem, quality=quality, bounds=jpeg.file_bounds(data) if file_bounds else None,
                        **kw)
        images[stem] = scored("y" if y_channel else "rgb", ref, jpeg_pixels, out)
    if not images:
        raise UsageError(f"no input under {inputs} has a usable reference under {refs}"
                         + (f" ({len(too_small)} under {SSIM_WINDOW} px a side)" if too_small else ""))
    _warn_too_small(too_small)
    channel = "y" if y_channel else ("gray" if gray_inputs == len(images) else "rgb")
    return _result(ckpt_path, channel, {GIVEN: images}, file_bounds=file_bounds)


def _restored(net: Network, pixels: np.ndarray, what: str, **kw) -> np.ndarray:
    """restore_image, or the evaluation ends (exit 1) naming the image: a non-finite output has no score."""
    try:
        return restore_image(net, pixels, **kw)
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(f"{what}: {e}") from None


def _some(names: list[str]) -> str:
    """The first few of `names`, for a warning that counts them."""
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


def _warn_too_small(names: list[str]) -> None:
    if names:
        warn(f"{len(names)} image(s) under {SSIM_WINDOW} px a side (SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window) "
             f"skipped: {_some(names)}")


def _image_files(root: Path, option: str) -> list[Path]:
    if not root.is_dir():
        raise UsageError(f"{option} folder not found: {root}")
    paths = find_inputs([str(root)])[0]
    if not paths:
        raise UsageError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return paths


def _load(ckpt_path, device: str, precision: str) -> Network:
    """The network a path names, or a Network given as it is (bench/field.py scores the JPEG alone so)."""
    return ckpt_path if isinstance(ckpt_path, Network) else load_network(ckpt_path, device, precision)


def _tiling(tile: Optional[int]) -> dict:
    kw = {"tile": tile or TILE, "overlap": 32, "batch": 4}
    try:
        check_tiling(**kw)
    except TilingError as e:
        raise said_as_option(e) from None
    return kw


def _result(ckpt_path, channel: str, per_q: dict, chroma: Optional[str] = None, double: Optional[int] = None,
            file_bounds: bool = True) -> dict:
    result = {"checkpoint": str(ckpt_path), "channel": channel, "chroma": chroma, "double": double,
              "file_bounds": file_bounds, "qualities": {}}
    for q, images in per_q.items():
        mean = {k: float(np.mean([img[k] for img in images.values()])) for k in KEYS}
        result["qualities"][q] = {"images": images, "mean": mean}
    return result


# ---------------------------------------------------------------------------------------------
# report


def format_report(result: dict) -> str:
    """One table: a row per quality, JPEG input and network side by side, the gains, and the worst
    image's PSNR gain."""
    lines = [f"checkpoint: {result['checkpoint']}", HEADERS[result["channel"]]]
    if result.get("chroma"):
        double = result.get("double")
        lines.append(f"JPEG: Pillow (libjpeg-turbo), standard tables, {result['chroma'][0]}:{result['chroma'][1]}:"
                     f"{result['chroma'][2]}" + (f"; double: first at quality {double}, the block grid shifted 1-7 px, "
                                                 "then the quality of the row" if double is not None else ""))
    if result.get("file_bounds") is False:
        lines.append("network alone: outputs not moved inside the JPEG file's quantization bins (--no-file-bounds)")
    lines.append("")
    head = (f"{'quality':>7} {'images':>6} | {'PSNR JPEG':>9} {'network':>8} {'gain':>7} {'worst':>7} | "
            f"{'SSIM JPEG':>9} {'network':>8} {'gain':>8} | {'PSNR-B JPEG':>11} {'network':>8} {'gain':>7}")
    lines += [head, "-" * len(head)]
    for q, block in result["qualities"].items():
        m, n = block["mean"], len(block["images"])
        worst = min(img["psnr_model"] - img["psnr_jpeg"] for img in block["images"].values())
        lines.append(f"{q:>7} {n:>6} | {m['psnr_jpeg']:>9.3f} {m['psnr_model']:>8.3f} "
                     f"{m['psnr_model'] - m['psnr_jpeg']:>+7.3f} {worst:>+7.3f} | {m['ssim_jpeg']:>9.4f} "
                     f"{m['ssim_model']:>8.4f} {m['ssim_model'] - m['ssim_jpeg']:>+8.4f} | {m['psnrb_jpeg']:>11.3f} "
                     f"{m['psnrb_model']:>8.3f} {m['psnrb_model'] - m['psnrb_jpeg']:>+7.3f}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """The network's gain over the JPEG input against the JPEG quality: mean PSNR gain and the worst
    image's, with the zero line (matplotlib, an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install -e '.[plot]'") from None
    qs = [q for q in result["qualities"] if q != GIVEN]
    if not qs:
        raise UsageError("--plot draws the gain against the quality: it needs --images and --quality")
    blocks = [result["qualities"][q] for q in qs]
    mean = [b["mean"]["psnr_model"] - b["mean"]["psnr_jpeg"] for b in blocks]
    worst = [min(i["psnr_model"] - i["psnr_jpeg"] for i in b["images"].values()) for b in blocks]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.plot([int(q) for q in qs], mean, marker="o", label="mean gain")
    ax.plot([int(q) for q in qs], worst, marker="v", linestyle="--", label="worst image")
    what = f"{result['channel']}, {result.get('chroma') or ''}" + (f", double from q{result['double']}" if result.get("double") else "")
    ax.set(xlabel="JPEG quality", ylabel=f"PSNR gain over the JPEG (dB; {what})", title=Path(result["checkpoint"]).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="PSNR / SSIM / PSNR-B of JPEG inputs and network "
               "outputs, the papers' protocol (see the module's documentation).")
    add_network_options(p, "checkpoint (EMA weights used when present), .onnx or .safetensors")
    p.add_argument("--images", help="folder of clean images (searched recursively), JPEG-encoded at each --quality")
    p.add_argument("--inputs", help="folder of JPEG files to score as they are (with --references)")
    p.add_argument("--references", help="folder of the originals of --inputs, matched by file stem")
    p.add_argument("--quality", type=int, nargs="+", help="JPEG qualities (default 10 20 30 40)")
    p.add_argument("--sweep", action="store_true", help=f"qualities {' '.join(map(str, SWEEP))}")
    p.add_argument("--chroma", default="420", choices=tuple(jpeg.CHROMA), help="chroma subsampling of colour JPEGs "
                   "(default 420, the papers'; phones and cameras often save 444)")
    p.add_argument("--double", type=int, metavar="Q1", help="double JPEG: first at quality Q1, the block grid shifted "
                   "1-7 px, then each --quality")
    p.add_argument("--gray", action="store_true", help="the grayscale benchmarks' protocol (MATLAB Y, one-channel JPEG)")
    p.add_argument("--y-channel", action="store_true", help="measure colour images on MATLAB Y instead of RGB")
    p.add_argument("--json", help="also write the per-image and mean results to this JSON file (atomically)")
    p.add_argument("--plot", help="also draw the PSNR gain against the quality into this PNG file (needs matplotlib)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=INFERENCE_PRECISIONS)
    p.add_argument("--tile", type=int, help=f"tile size (default {TILE}: the benchmarks' images in one piece)")
    p.add_argument("--no-file-bounds", dest="file_bounds", action="store_false", help="score the network alone: "
                   "do not move its output inside the quantization bins of the input's JPEG file, as restore does")
    p.add_argument("--max-side", type=int, default=0,
                   help="centre-crop images to at most this many pixels a side for a quick look (default 0: whole images)")
    return p


def main(argv=None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        if bool(args.inputs) != bool(args.references) or bool(args.images) == bool(args.inputs):
            raise UsageError("give --images DIR, or --inputs DIR with --references DIR")
        given = [opt for opt, value in (("--quality", args.quality), ("--sweep", args.sweep), ("--gray", args.gray),
                                        ("--max-side", args.max_side), ("--plot", args.plot),
                                        ("--chroma", args.chroma != "420"), ("--double", args.double is not None))
                 if value]
        if args.inputs and given:
            raise UsageError(f"{', '.join(given)} work with --images, not with --inputs (its files are scored as they are)")
        if args.quality and args.sweep:
            raise UsageError("give --quality or --sweep, not both")
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install -e '.[plot]'") from None
        runtime = Runtime(args.device, args.precision, args.tile, progress=True)
        source = chosen_network(args)
        if args.inputs:
            result = evaluate_pairs(source, args.inputs, args.references, y_channel=args.y_channel,
                                    file_bounds=args.file_bounds, runtime=runtime)
        else:
            protocol = Protocol(tuple(SWEEP if args.sweep else args.quality or QUALITIES), args.gray, args.y_channel,
                                args.chroma, args.double, args.max_side, args.file_bounds)
            try:
                result = evaluate(source, args.images, protocol, runtime)
            except ProtocolError as e:  # the library's words, with the flag that set the field
                raise said_as_option(e, FLAGS) from None
        print(format_report(result))
        if args.json:
            atomic_write_json(args.json, result)
        if args.plot:
            plot(result, args.plot)
        return 0

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
