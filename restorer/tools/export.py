"""Export a trained network for use outside this project's training code.

    python -m restorer export --ckpt CKPT --format onnx|torchscript|safetensors --out FILE

* onnx: the network with dynamic batch, height and width (any H x W: the U-Nets pad inside), the
  card below in the file's metadata (key "restorer"). Checked with onnxruntime against PyTorch on
  odd sizes before it is kept: the largest difference must be within 1/255.
* torchscript: torch.jit.script of the network (no Python needed to run it; torch.jit.load).
* safetensors: the weights (no pickle: any tool can read them) with the card in the header's
  metadata, and the card beside it as a .json (net.safetensors: net.json). restorer.tools.restore and
  restorer.tools.evaluate take all onnx and safetensors files (and checkpoints) as --ckpt; TorchScript is
  for other programs.

An --out that is the checkpoint (a link to it included) or a folder, and a safetensors --out that is
its own card's name (w.json), are refused before anything is written (exit 2).

Every format takes float32 N x C x H x W in [0, 1] (C = 3 for RGB, 1 for grayscale) and returns the
restored image the same way (clamp to [0, 1]). A network conditioned on the JPEG quality takes a
second input, `quality`: float32 N, the IJG quality (1-100) of each input's quantization tables
(restorer.data.jpeg.table_quality reads them from a file). restore then moves the output inside the
quantization bins of the input's JPEG file (restorer.data.jpeg.FileBounds); a program that wants
restore's pixels does the same. The card (restorer.formats.checkpoint): the network's name and options, its
conditioning and how to feed it and its output, channels, the training's JPEG qualities and
degradations, its steps and best validation PSNR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from restorer.base.cli import Parser, one_line, run
from restorer.base.errors import RunError
from restorer.base.fileio import atomic_open
from restorer.infer.inference import ONNX_CARD_KEY, load_checkpoint_network
from restorer.base.fileio import refuse_overwrites

PROG = "restorer export"

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1 / 255  # an exported network's output may differ from PyTorch's by less than one grey level
CHECK_SIZES = ((1, 37, 53), (2, 64, 40))  # (batch, height, width): odd sizes, not multiples of the U-Nets' 16


class ExportError(RunError):
    """The export cannot be done or did not check out; one line (exit 1: the checkpoint was fine)."""


def _inputs(model: torch.nn.Module, n: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Example inputs: the image, and for a network conditioned on the quality, one per image."""
    x = torch.rand(n, model.in_channels, h, w, generator=gen)
    if not getattr(model, "takes_quality", False):
        return (x,)
    return x, torch.randint(5, 96, (n,), generator=gen).float()


def _check(run, model: torch.nn.Module, what: str) -> float:
    """The largest difference between `run` (the exported network) and PyTorch on odd sizes."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for n, h, w in CHECK_SIZES:
        inputs = _inputs(model, n, h, w, gen)
        with torch.inference_mode():
            ref = model(*inputs).clamp(0, 1)
        out = torch.as_tensor(run(*inputs)).clamp(0, 1)
        if out.shape != ref.shape:
            raise ExportError(f"the {what} network gave {tuple(out.shape)} for input {tuple(inputs[0].shape)}")
        worst = max(worst, (out - ref).abs().max().item())
    if worst > TOLERANCE:
        raise ExportError(f"the {what} network differs from PyTorch by {worst:.2e} (> 1/255): not written")
    return worst


def export_onnx(model: torch.nn.Module, card: dict, out: Path) -> float:
    try:
        import onnx
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch's ONNX exporter writes the graph with it)
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[export]'") from None
    dynamic = torch.export.Dim.DYNAMIC
    inputs = _inputs(model, 1, 37, 53, torch.Generator().manual_seed(0))
    names = ["input", "quality"][:len(inputs)]
    shapes = {"x": {0: dynamic, 2: dynamic, 3: dynamic}, "quality": {0: dynamic}}
    tmp = out.with_name(f".{out.name}.export")
    try:
        torch.onnx.export(model, inputs, str(tmp), dynamo=True, input_names=names, output_names=["output"],
                          dynamic_shapes={k: shapes[k] for k in ["x", "quality"][:len(inputs)]}, verbose=False)
        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key=ONNX_CARD_KEY, value=json.dumps(card))
        data = proto.SerializeToString()
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the exporter and onnxruntime raise many kinds: one line for the user
        raise ExportError(f"the ONNX export failed: {type(e).__name__}: {one_line(e)[:300]}") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
    worst = _check(lambda *xs: session.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0], model, "ONNX")
    with atomic_open(out, "wb") as f:
        f.write(data)
    return worst


def export_torchscript(model: torch.nn.Module, card: dict, out: Path) -> float:
    try:
        scripted = torch.jit.script(model)
    except Exception as e:  # noqa: BLE001 - TorchScript's compiler errors: one line for the user
        raise ExportError(f"TorchScript cannot compile this network: {one_line(e)[:300]}") from None
    worst = _check(lambda *xs: scripted(*xs).detach(), model, "TorchScript")
    with atomic_open(out, "wb") as f:
        torch.jit.save(scripted, f, _extra_files={"restorer.json": json.dumps(card)})
    return worst


def card_path(out: Path) -> Path:
    """Where export_safetensors writes the card beside the weights."""
    return out.with_suffix(".json")


def export_safetensors(model: torch.nn.Module, card: dict, out: Path) -> float:
    try:
        from safetensors.torch import save
    except ImportError:
        raise ExportError("safetensors export needs safetensors (a requirement of restorer): pip install safetensors") from None
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_open(out, "wb") as f:
        f.write(save(weights, metadata={ONNX_CARD_KEY: json.dumps(card)}))
    with atomic_open(card_path(out), "w") as f:
        json.dump(card, f, indent=1)
        f.write("\n")
    return 0.0


EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript, "safetensors": export_safetensors}


def export(ckpt: str, fmt: str, out: str) -> float:
    """Export; returns the largest difference from PyTorch measured on odd sizes."""
    path = Path(out)
    outputs = [("--out", path)]
    if fmt == "safetensors" and path.name:  # (no name: "." or "/", a folder, refused as such)
        outputs.append(("its card", card_path(path)))
    refuse_overwrites(outputs, [("--ckpt", Path(ckpt))], hint="give --out a file name of its own")
    model, checkpoint = load_checkpoint_network(ckpt)
    card = checkpoint.card()
    path.parent.mkdir(parents=True, exist_ok=True)
    return EXPORTERS[fmt](model, card, path)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint (best.pt, last.pt)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="the file to write")

    def body() -> int:
        args = p.parse_args(argv)
        worst = export(args.ckpt, args.format, args.out)
        checked = f"; checked against PyTorch on odd sizes: max difference {worst:.1e}" if args.format != "safetensors" else ""
        print(f"{PROG}: wrote {args.out} ({args.format}){checked}")
        return 0

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
