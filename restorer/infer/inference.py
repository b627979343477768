"""One inference core: restore, evaluate, export and the trainer's validation load networks, pick
the device and the precision, convert uint8 <-> float and tile through the functions here.

A network comes from a checkpoint (rebuilt from the file alone, EMA weights when present) or from a
network exported as ONNX or safetensors (restorer.tools.export), and runs in fp32 by default everywhere;
`precision="bf16"` uses autocast (CUDA, and CPUs with bf16 instructions). Loading refuses in one line
(CheckpointError) a card whose fields are of the wrong type, a TorchScript export and weights that
hold NaN or inf; an output that is not finite anyway raises NonFiniteOutputError before any of it is kept.

Tiling (:func:`restore_array`)
------------------------------
* Tiles are ``tile`` px square (a multiple of 8), origins step by ``tile - overlap`` rounded
  down to a multiple of 8 (at least 8), so every origin lies on the 8x8 JPEG grid; the last
  row/column of tiles is aligned to the (padded) border. Tiles go through the model ``batch`` at a time.
* Each axis is (virtually) reflect-padded to a multiple of 8: the < 8 missing pixels are padded
  per tile, never for the whole image, and cropped from the result; the last tile is aligned to
  that padded border, so every origin is a multiple of 8. An axis shorter than ``tile`` gets a
  single tile of its padded length. (So the tiled and whole-image results see the same borders.)
* Tiles are blended with separable weights. On each side that has a neighbouring tile, the
  weight over the ``overlap`` px is 1e-3 (never 0) in the outer quarter, ramps linearly up to 1
  across the middle half, and is 1 beyond. The near-zero outer quarter matters: a convolution
  sees zero padding at a tile edge, so the pixels within its receptive radius of the edge are
  wrong; with ``overlap/4`` >= that radius (8 px at the default overlap 32; the seed network's
  radius is 7) the tiled result equals the whole-image result up to rounding. The U-Nets see much
  further in principle, but their trained output depends little on far pixels: within 1-2 grey
  levels of the whole-image result at the defaults (tests/test_models.py).
  Because the tile grid is a product grid, the sum of weights is separable too: it is kept as
  two 1-D arrays, so the result is an exact weighted average at every pixel.
* Memory is bounded by the tile size: the image is processed one row of tiles (a band) at a
  time; a float32 accumulator of ``tile`` rows x image width, on the network's device, holds the
  rows still open, and rows no later band touches are normalised, clamped to [0, 1], rounded and
  copied into the uint8 output. No full-size float array is ever allocated. On CUDA the blending
  stays on the GPU: one copy to the host per band of finished rows.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

from restorer.formats.checkpoint import Checkpoint, CheckpointError, card_qualities, read_checkpoint
from restorer.base.errors import FieldError, RunError, UsageError, one_line
from restorer.data import jpeg
from restorer.data.decode import IMAGE_EXTENSIONS, load_image, to_rgb_array
from restorer.base.colour import luma, rgb, ycbcr
from restorer.models import NetworkSpec, load_weights
from restorer.base.device import INFERENCE_PRECISIONS, autocast, resolve_device, to_float

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
MIN_WEIGHT = 1e-3
ONNX_CARD_KEY = "restorer"  # the metadata entry of an exported file that holds the network's card (restorer.tools.export)
CHANNELS = (1, 3)  # the images restore and evaluate feed a network: grayscale or RGB


class NonFiniteOutputError(RunError):
    """The network's output holds NaN or inf (damaged weights, or values that overflow): nothing of it
    may be written or scored; one line."""


# --------------------------------------------------------------------------------------------
# Devices, precision, tensors
# --------------------------------------------------------------------------------------------

@dataclass
class Network:
    """A restoration network ready to run: float N x C x H x W in [0, 1] on `device` and the inputs'
    JPEG qualities (N,) in, the restored batch (float32) out. `module` is the torch network (None for
    an ONNX file); `card` says what it was trained on (restorer.formats.checkpoint.Checkpoint.card)."""

    forward: Callable[..., torch.Tensor]
    in_channels: int
    grayscale: bool
    device: torch.device
    precision: str = "fp32"
    name: str = ""
    module: Optional[nn.Module] = None
    takes_quality: bool = False  # the network is conditioned on the JPEG quality
    card: dict = field(default_factory=dict)

    @property
    def trained_qualities(self) -> Optional[tuple[int, int]]:
        """The range of JPEG qualities the network was trained on, when its card says."""
        return card_qualities(self.card)

    def __call__(self, x: torch.Tensor, quality: Optional[float] = None) -> torch.Tensor:
        """`quality`: the IJG quality of the input's JPEG tables (what the network is conditioned
        on); networks that are not conditioned ignore it."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            if not self.takes_quality:
                return self.forward(x).float()
            if quality is None:
                raise ValueError(f"{self.name or 'this network'} is conditioned on the JPEG quality: give the input's quality")
            return self.forward(x, torch.full((x.shape[0],), float(quality), device=self.device)).float()


def warm_up(network: Network, tile: int, batch: int) -> None:
    """One batch of tiles through the network before the real work: on CUDA the first call of a
    shape picks its kernels (cudnn.benchmark) and allocates; timings and progress after it are the
    steady state's."""
    x = torch.zeros(batch, network.in_channels, tile, tile, device=network.device).contiguous(
        memory_format=torch.channels_last)
    network(x, 50.0)
    if network.device.type == "cuda":
        torch.cuda.synchronize(network.device)


def as_network(network: Network | nn.Module) -> Network:
    if isinstance(network, Network):
        return network
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    network.eval()
    return Network(network, network.in_channels, network.in_channels == 1, device, module=network,
                   takes_quality=bool(getattr(network, "takes_quality", False)))


def load_network(path: str | Path, device: str | torch.device | None = "auto", precision: str = "fp32") -> Network:
    """A checkpoint (.pt), or a network exported as .onnx or .safetensors, ready to run.
    CheckpointError (one line) when the file cannot be used."""
    path = Path(path)
    if precision not in INFERENCE_PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    if path.suffix.lower() == ".onnx":
        return _onnx_network(path, dev, precision)
    if path.suffix.lower() == ".safetensors":
        model, spec, card = _safetensors_model(path)
    else:
        if _is_torchscript(path):  # torch.load's own refusal would suggest weights_only=False: unsafe advice
            raise CheckpointError(f"{path} is a TorchScript export, for other programs: give its checkpoint, "
                                  "or an .onnx or .safetensors export")
        model, checkpoint = load_checkpoint_network(path)
        spec, card = checkpoint.network, _checked_card(checkpoint.card(), path)
    # channels_last on every device: 1.5-1.8x faster on CPUs too (AVX2 and AVX-512 alike), for every network
    model = model.to(dev, memory_format=torch.channels_last)
    return Network(model, spec.in_channels, spec.grayscale, dev, precision, spec.name, model, spec.takes_quality, card)


def _onnx_network(path: Path, device: torch.device, precision: str) -> Network:
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("running an .onnx file needs onnxruntime: pip install -e '.[export]'") from None
    if precision != "fp32":
        raise UsageError(f"an ONNX file runs in the precision it was exported in (fp32), not {precision}")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise CheckpointError(f"cannot load {path}: {one_line(e)}") from None
    card = session.get_modelmeta().custom_metadata_map.get(ONNX_CARD_KEY, "{}")
    card = _checked_card(_card_json(card, path), path)
    _refuse_non_finite(_onnx_initializers(path), path)
    inputs = session.get_inputs()
    shape = inputs[0].shape
    if len(shape) != 4:
        raise CheckpointError(f"{path}: its input has {len(shape)} dimensions, not N x C x H x W")
    channels = shape[1] if _is_int(shape[1]) else card.get("in_channels", 3)  # a named dimension: the card says
    if channels not in CHANNELS:
        raise CheckpointError(f"{path}: its input has {channels} channels; restore and evaluate feed 1 (grayscale) "
                              "or 3 (RGB)")
    names = [i.name for i in inputs]

    def forward(x: torch.Tensor, quality: Optional[torch.Tensor] = None) -> torch.Tensor:
        feed = {names[0]: x.detach().float().cpu().contiguous().numpy()}
        if quality is not None:
            feed[names[1]] = quality.detach().float().cpu().numpy()
        return torch.from_numpy(session.run(None, feed)[0]).to(device)

    return Network(forward, channels, bool(card.get("grayscale", channels == 1)), device, "fp32",
                   card.get("network", path.stem), takes_quality=len(names) > 1, card=card)


def _safetensors_model(path: Path) -> tuple[nn.Module, NetworkSpec, dict]:
    """A network exported as safetensors: weights plus the card in the header (restorer.tools.export)."""
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        from safetensors import safe_open
    except ImportError:
        raise UsageError("reading a .safetensors file needs safetensors (a requirement of restorer): pip install safetensors") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(ONNX_CARD_KEY)
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged file: the library's own error types
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    card = _card_json(text, path) if text is not None else None
    if not isinstance(card, dict) or not {"network", "in_channels"} <= card.keys():
        raise CheckpointError(f"{path} has no restorer card (network, in_channels) in its metadata "
                              "(export it with python -m restorer export)")
    card = _checked_card(card, path)
    spec = NetworkSpec(card["network"], dict(card.get("options") or {}), card["in_channels"],
                       card.get("grayscale", card["in_channels"] == 1))
    return _built(spec, weights, path), spec, card


def _card_json(text: str, path: Path):
    """The card an exported file's metadata holds, as JSON says it (any type: checked_card checks it)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # not JSON, or nested past the parser's depth
        raise CheckpointError(f"{path}: its restorer card is not JSON ({one_line(e, 80)})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_quality_list(value) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(_is_int(q) and 1 <= q <= 100 for q in value)


# The card's fields restore and evaluate read, and what each must be when it is there.
_CARD_FIELDS = {
    "network": (lambda v: isinstance(v, str) and v != "", "a network's name"),
    "options": (lambda v: v is None or isinstance(v, dict), "an object of the network's options"),
    "in_channels": (lambda v: _is_int(v) and v in CHANNELS, "1 (grayscale) or 3 (RGB)"),
    "grayscale": (lambda v: isinstance(v, bool), "true or false"),
    "training": (lambda v: v is None or isinstance(v, dict), "an object"),
}
_TRAINING_FIELDS = {  # version 1 cards said jpeg_quality
    key: (lambda v: v is None or _is_quality_list(v), "2 or more JPEG qualities in 1..100")
    for key in ("qualities", "jpeg_quality")
}


def _checked_card(card, path) -> dict:
    """`card` (a network's, from its file) when the fields restore and evaluate read are of their
    types; CheckpointError (one line) naming the first that is not. A field left out stays out."""
    if not isinstance(card, dict):
        raise CheckpointError(f"{path}: its restorer card is not a JSON object: {one_line(repr(card), 60)}")
    training = card.get("training") or {}
    for fields, where, record in ((_CARD_FIELDS, "", card), (_TRAINING_FIELDS, "training.", training)):
        for key, (fits, what) in fields.items():
            if key in record and not fits(record[key]):
                raise CheckpointError(f"{path}: its card's {where}{key} must be {what}, "
                                      f"got {one_line(repr(record[key]), 60)}")
    return card


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive (torch.jit.save): a zip holding constants.pkl, which a checkpoint never does."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip (an old-style checkpoint) or unreadable: read_checkpoint says
        return False


def _onnx_initializers(path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """An ONNX file's weights held in the file (its initializers) as float tensors; none without
    the onnx package or for a file it cannot parse (the network's outputs are still checked)."""
    try:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - no onnx package, or a file only onnxruntime reads
        return
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:  # its data lives elsewhere: not read here
            continue
        try:
            array = numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - a tensor onnx cannot decode: onnxruntime judges the file
            continue
        if array.dtype.kind == "f":
            yield tensor.name, torch.from_numpy(np.array(array))  # a copy: onnx's array is read-only (torch warns)


def _refuse_non_finite(weights: Iterable[tuple[str, torch.Tensor]], source) -> None:
    """CheckpointError (one line) when a weight holds NaN or inf: every output of such a network
    is damaged (a NaN turns a whole image black), so nothing is restored with it."""
    damaged = [(name, t) for name, t in weights if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if damaged:
        name, t = damaged[0]
        kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
        raise CheckpointError(f"{source}: its weights are damaged: {len(damaged)} tensor(s) hold NaN or inf "
                              f"({name} holds {kind}); use another checkpoint")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def network_weights(path: str | Path) -> tuple[NetworkSpec, dict]:
    """The network a checkpoint (.pt: its EMA weights when present) or a .safetensors export holds, as
    (spec, weights): what a training starts from (train.init_from). CheckpointError (one line) for a
    file that cannot be used."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        model, spec, _ = _safetensors_model(path)
        return spec, model.state_dict()
    model, checkpoint = load_checkpoint_network(path)
    return checkpoint.network, model.state_dict()


def load_checkpoint_network(ckpt_path: str | Path) -> tuple[nn.Module, Checkpoint]:
    """The network rebuilt from a checkpoint alone (on the CPU, in eval mode, EMA weights when
    present) and the checkpoint. CheckpointError (one line) for a file that cannot be used."""
    checkpoint = read_checkpoint(ckpt_path)
    return _built(checkpoint.network, checkpoint.inference_weights, ckpt_path), checkpoint


def _built(spec: NetworkSpec, weights: dict, source) -> nn.Module:
    """The network of `spec` with `weights`, in eval mode; CheckpointError when they do not fit."""
    try:
        model = spec.build()
    except ValueError as e:  # an unknown network or option
        raise CheckpointError(f"{source}: {e}") from None
    try:
        load_weights(model, weights, str(source))
    except ValueError as e:  # weights of another shape (the message names the file)
        raise CheckpointError(str(e)) from None
    _refuse_non_finite(model.state_dict().items(), source)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tiled inference
# --------------------------------------------------------------------------------------------

def _ceil8(n: int) -> int:
    return (n + 7) // 8 * 8


def _tile_layout(length: int, tile: int, step: int) -> tuple[int, list[int]]:
    """(tile size along this axis, tile origins) over the axis padded to a multiple of 8.

    Every origin is a multiple of 8; the last one is aligned to the padded border.
    """
    padded = _ceil8(length)
    if padded <= tile:
        return padded, [0]
    origins = list(range(0, padded - tile, step))
    origins.append(padded - tile)
    return tile, origins


def _ramp(size: int, overlap: int, start: bool, end: bool) -> np.ndarray:
    """1-D blending weights of one tile, on the sides that have a neighbour: MIN_WEIGHT over the
    outer quarter of the overlap, a linear ramp up to 1 across its middle half, 1 beyond."""
    w = np.ones(size, np.float32)
    n = min(overlap, size)
    if n > 0:
        margin = n // 4
        i = np.arange(n, dtype=np.float32)
        ramp = np.clip((i - margin + 1) / (n - 2 * margin + 1), MIN_WEIGHT, 1.0)
        if start:
            w[:n] = np.minimum(w[:n], ramp)
        if end:
            w[size - n:] = np.minimum(w[size - n:], ramp[::-1])
    return w


def _axis_weights(size: int, origins: list[int], overlap: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-tile 1-D weights and their sum over the padded axis."""
    total = np.zeros(origins[-1] + size, np.float32)
    weights = []
    for i, o in enumerate(origins):
        w = _ramp(size, overlap, start=i > 0, end=i < len(origins) - 1)
        total[o:o + size] += w
        weights.append(w)
    return weights, total


def _extract(image: np.ndarray, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """image[y0:y0+th, x0:x0+tw], reflect-padded past the border (only ever < 8 px)."""
    h, w = image.shape[:2]
    part = image[y0:min(y0 + th, h), x0:min(x0 + tw, w)]
    py, px = th - part.shape[0], tw - part.shape[1]
    if py or px:
        mode_y = "reflect" if part.shape[0] > 1 else "edge"
        mode_x = "reflect" if part.shape[1] > 1 else "edge"
        part = np.pad(part, ((0, py), (0, 0), (0, 0)), mode=mode_y)
        part = np.pad(part, ((0, 0), (0, px), (0, 0)), mode=mode_x)
    return part


class TilingError(FieldError):
    """A tile size, overlap or batch restore_array cannot use."""


def check_tiling(tile: int, overlap: int, batch: int) -> None:
    """The one check of restore_array's tiling (TilingError, one line)."""
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not whole(tile) or tile < 8 or tile % 8:
        raise TilingError("tile", f"must be a positive multiple of 8, got {tile!r}")
    if not whole(overlap) or not 0 <= overlap <= tile // 2:
        raise TilingError("overlap", f"must be in [0, tile/2 = {tile // 2}], got {overlap!r}")
    if not whole(batch) or batch < 1:
        raise TilingError("batch", f"must be >= 1, got {batch!r}")


def _finished_rows(vals: torch.Tensor, top: int, bounds: Optional[jpeg.FileBounds]) -> np.ndarray:
    """Rows of the blended output (C x rows x W floats in [0, 1], from row `top`) as uint8 rows x W x C:
    clamped and rounded, or moved inside the file's bins first. A non-finite value ends it (one line)."""
    if not bool(torch.isfinite(vals).all()):  # (NaN survives the blending; clamping would hide inf)
        kind = "NaN" if bool(torch.isnan(vals).any()) else "inf"
        raise NonFiniteOutputError(f"the network's output is not finite ({kind}): its weights are damaged "
                                   "or its values overflow")
    vals = vals.clamp_(0.0, 1.0).mul_(255.0)
    if bounds is None:
        return vals.round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    band = vals.permute(1, 2, 0).cpu().numpy()  # bands start on the 8x8 grid (every tile origin does): no block straddles two
    return bounds.project_rows(band[..., 0] if band.shape[2] == 1 else band, top).reshape(band.shape)


def restore_array(network: Network | nn.Module, image: np.ndarray, tile: int = 256, overlap: int = 32,
                  batch: int = 8, quality: Optional[float] = None,
                  bounds: Optional[jpeg.FileBounds] = None) -> np.ndarray:
    """Restore an ``(H, W, C)`` uint8 image (``(H, W)`` is taken as one channel) with `network` (a
    Network, or a bare module: fp32 on its parameters' device) into a uint8 array of its shape;
    `quality` is its JPEG's, for a network conditioned on it. With `bounds` (the image's JPEG file's:
    restorer.data.jpeg.file_bounds) each finished band of rows is moved inside them before it is
    rounded. See the module docstring for the tiling."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError("image must be an (H, W, C) or (H, W) uint8 numpy array")
    check_tiling(tile, overlap, batch)
    squeeze = image.ndim == 2
    image = image[..., None] if squeeze else image
    h, w, c = image.shape
    if h == 0 or w == 0:
        raise ValueError(f"empty image {w}x{h}")
    net = as_network(network)
    if net.in_channels != c:
        raise ValueError(f"the network takes {net.in_channels} channel(s), the image has {c}")

    step = max(8, (tile - overlap) // 8 * 8)
    th, ys = _tile_layout(h, tile, step)
    tw, xs = _tile_layout(w, tile, step)
    wys, sum_y = _axis_weights(th, ys, overlap)
    wxs, sum_x = _axis_weights(tw, xs, overlap)
    wp = xs[-1] + tw  # padded width
    dev = net.device  # the blending happens where the network runs: no per-tile trip to the host
    on_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    wys_d, wxs_d = [on_dev(v) for v in wys], [on_dev(v) for v in wxs]
    inv_y, inv_x = on_dev(1.0 / sum_y), on_dev(1.0 / sum_x[:w])

    out = np.empty((h, w, c), np.uint8)
    acc = torch.zeros((c, th, wp), dtype=torch.float32, device=dev)  # rows [ys[r], ys[r] + th) of the weighted sum
    done = 0  # rows of `out` written so far

    for r, y0 in enumerate(ys):
        for b in range(0, len(xs), batch):
            chunk = xs[b:b + batch]
            tiles = torch.from_numpy(np.stack([_extract(image, y0, x0, th, tw) for x0 in chunk]))
            if dev.type == "cuda":  # staged in pinned memory: the upload is a DMA, not a paged copy
                tiles = tiles.pin_memory()
            res = net(to_float(tiles.permute(0, 3, 1, 2), dev, channels_last=True), quality)  # n x c x th x tw
            for k, x0 in enumerate(chunk):
                acc[:, :, x0:x0 + tw] += res[k] * (wys_d[r][:, None] * wxs_d[b + k][None, :])
            del res, tiles
        # Rows before the next band's origin are final: normalise, clamp, round, write.
        last = r == len(ys) - 1
        d = th if last else ys[r + 1] - y0
        stop = min(y0 + d, h)
        if stop > done:
            vals = acc[:, done - y0:stop - y0, :w] * inv_y[done:stop][None, :, None] * inv_x[None, None, :]
            out[done:stop] = _finished_rows(vals, done, bounds)
            done = stop
            del vals
        if not last:  # slide the window: keep the open rows, zero the new ones
            acc[:, :th - d] = acc[:, d:].clone()
            acc[:, th - d:] = 0.0
    return out[..., 0] if squeeze else out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def is_grayscale(im: Image.Image) -> bool:
    return im.mode in GRAY_MODES or im.mode.startswith("I;16")


def read_image(path: Path) -> tuple[np.ndarray, bool]:
    """``(array, grayscale)``: (H, W) uint8 for grayscale files, (H, W, 3) uint8 otherwise.

    Orientation, alpha (over white) and 16-bit scaling as in :func:`restorer.data.decode_image`.
    Raises ImageDecodeError or OSError.
    """
    return decode_file(path.read_bytes())


def decode_file(data: bytes) -> tuple[np.ndarray, bool]:
    """A file's bytes as :func:`read_image` gives them."""
    im = load_image(data)
    gray = is_grayscale(im)
    rgb = to_rgb_array(im)
    return (np.ascontiguousarray(rgb[..., 0]) if gray else rgb), gray


def input_quality(data: bytes, pixels: np.ndarray) -> tuple[Optional[int], str]:
    """(quality, how): the IJG quality a file's JPEG tables say (how = "tables"); for a file without
    usable tables (a PNG, a JPEG with none or absurd ones) the quality seen in its pixels ("pixels"),
    or (None, "none") when they show no JPEG trace."""
    quality = jpeg.file_quality(data)
    if quality is not None:
        return quality, "tables"
    quality = jpeg.pixel_quality(pixels)
    return quality, "pixels" if quality is not None else "none"


def restore_gray(network: Network, gray: np.ndarray, **kw) -> np.ndarray:
    """A one-channel (H, W) uint8 image through any network: an RGB one gets it as three equal
    channels, and its output's mean over them is the result."""
    if network.in_channels == 1:
        return restore_array(network, gray, **kw)
    rgb = restore_array(network, np.repeat(gray[..., None], 3, axis=2), **kw)
    return np.round(rgb.astype(np.float32).mean(axis=2)).astype(np.uint8)


def restore_image(network: Network, image: np.ndarray, bounds: Optional[jpeg.FileBounds] = None, **kw) -> np.ndarray:
    """Restore a (H, W) grayscale or (H, W, 3) RGB uint8 image; the output has the same shape.

    A grayscale image through an RGB model is replicated to 3 channels and converted back to L;
    an RGB image through a grayscale model has its luma restored (restorer.base.colour.luma, what
    the network trained on) and keeps its chroma (Cb, Cr). With `bounds`, the image's JPEG file's
    (:func:`restorer.data.jpeg.file_bounds`), the result is moved inside them before it is rounded.
    """
    if (image.ndim == 2) == (network.in_channels == 1):  # the network takes the image as it is
        return restore_array(network, image, bounds=bounds, **kw)  # projected band by band: memory stays bounded
    if image.ndim == 2:
        out = restore_gray(network, image, **kw)
    else:
        ycc = ycbcr(image)
        ycc[..., 0] = restore_array(network, luma(image), **kw)
        out = rgb(ycc)
    return out if bounds is None else bounds.project(out)  # (rounded twice here: a grey level at most)


def find_inputs(paths: Iterable[str], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """(files, missing): explicit files as given, folders walked for image extensions."""
    files, missing, seen = [], [], set()
    exclude = exclude.resolve() if exclude is not None else None
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not (exclude is not None and exclude in f.resolve().parents)
            )
        elif p.is_file():
            found = [p]
        else:
            missing.append(str(p))
            continue
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, missing
