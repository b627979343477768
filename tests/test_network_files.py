"""Network files restore and evaluate must refuse in one line, before any output is written: exported
files whose card (their metadata JSON) has fields of the wrong type, a TorchScript export, weights
that hold NaN or inf; and a network whose output is not finite fails its files (exit 1), unwritten
and unscored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch

from helpers import cli_here, encode, photo_like, require, save_network, write
from restorer.formats.checkpoint import read_checkpoint
from restorer.tools.evaluate import main as evaluate_main
from restorer.models import build_model
from restorer.tools.restore import main as restore_main

require("onnx", "export")
require("onnxruntime", "export")


def _seed(path: Path, damage=None) -> Path:
    """A seed network's checkpoint, as the trainer writes one; `damage(state_dict)` changes its weights first."""
    torch.manual_seed(0)
    model = build_model("seed", in_channels=3, residual=True)
    if damage is not None:
        with torch.no_grad():
            damage(model.state_dict())
    return save_network(path, model, "seed", {"residual": True}, config={"data": {"jpeg": {"quality": [10, 60]}}})


def _safetensors(path: Path, ckpt: Path, **change) -> Path:
    """The checkpoint's network as restorer.tools.export writes it in safetensors, its card's fields changed by `change`."""
    checkpoint = read_checkpoint(ckpt)
    weights = {k: v.contiguous() for k, v in checkpoint.inference_weights.items()}
    card = json.dumps({**checkpoint.card(), **change})
    path.write_bytes(safetensors_torch.save(weights, metadata={"restorer": card}))
    return path


def _onnx(path: Path, card_text: str = "{}", op: str = "Identity", constant: float | None = None,
          shape: tuple = ("N", 3, "H", "W")) -> Path:
    """A hand-made ONNX network on `shape`: the identity, or `op` (Mul, Div) with one weight,
    `constant`, an initializer; `card_text` in the metadata as restorer.tools.export puts it."""
    from onnx import TensorProto, helper

    inputs = ["input"] + (["w"] if constant is not None else [])
    weights = [helper.make_tensor("w", TensorProto.FLOAT, [], [constant])] if constant is not None else []
    graph = helper.make_graph([helper.make_node(op, inputs, ["output"])], "net",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    model.metadata_props.add(key="restorer", value=card_text)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory) -> Path:
    return _seed(tmp_path_factory.mktemp("seed") / "seed.pt")


@pytest.fixture
def photos(tmp_path) -> Path:
    write(tmp_path / "photos" / "a.jpg", encode(photo_like(40, 24, 1), "JPEG", quality=30))
    write(tmp_path / "photos" / "b.png", encode(photo_like(24, 32, 2), "PNG"))
    return tmp_path / "photos"


def _restore(ckpt: Path, photos: Path, out: Path, *options: str):
    """restore into the folder `out`."""
    return cli_here(restore_main, "--ckpt", ckpt, photos, "--out", out, "--tile", "32", "--overlap", "8", *options)


def _evaluate(ckpt: Path, photos: Path, out: Path):
    """evaluate, its results into the JSON file `out`."""
    return cli_here(evaluate_main, "--ckpt", ckpt, "--images", photos, "--quality", "30", "--json", out)


TOOLS = {"restore": _restore, "evaluate": _evaluate}


def _one_error_line(p, prog: str, code: int, *words: str) -> str:
    """The tool ended with `code` and said one line `PROG: error: ...` holding `words`, nothing else."""
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"restorer {prog}: error: "), p.stderr[-3000:]
    assert all(w in p.stderr for w in words), p.stderr
    return p.stderr


SAFETENSORS_CARDS = {  # card changes -> what the line names
    "in_channels a word": ({"in_channels": "three"}, "in_channels"),
    "options a list": ({"options": [1, 2]}, "options"),
    "network a number": ({"network": 5}, "network"),
    "grayscale a word": ({"grayscale": "no"}, "grayscale"),
    "one quality a word": ({"training": {"qualities": ["a"]}}, "training.qualities"),
    "qualities words": ({"training": {"qualities": ["a", "b"]}}, "training.qualities"),
    "training a list": ({"training": [10, 60]}, "training"),
    "qualities nested": ({"training": {"qualities": [[10], [60]]}}, "training.qualities"),
}
ONNX_CARDS = {
    "not JSON": ("{not json", "not JSON"),
    "nested past the parser": ("[" * 100_000, "not JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "network a number": ('{"network": 5}', "network"),
    "grayscale a word": ('{"grayscale": "yes"}', "grayscale"),
    "qualities words": ('{"training": {"qualities": ["a", "b"]}}', "training.qualities"),
    "in_channels 4": ('{"in_channels": 4}', "in_channels"),
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("case", [f"safetensors: {c}" for c in SAFETENSORS_CARDS] + [f"onnx: {c}" for c in ONNX_CARDS])
def test_a_card_field_of_the_wrong_type_is_one_line_and_exit_2_before_any_output(tmp_path, seed_ckpt, photos, tool,
                                                                                 case):
    fmt, name = case.split(": ")
    if fmt == "safetensors":
        change, named = SAFETENSORS_CARDS[name]
        net = _safetensors(tmp_path / "net.safetensors", seed_ckpt, **change)
    else:
        card_text, named = ONNX_CARDS[name]
        net = _onnx(tmp_path / "net.onnx", card_text)
    out = tmp_path / "out"
    _one_error_line(TOOLS[tool](net, photos, out), tool, 2, str(net), named)
    assert not out.exists()


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("shape", "said"), [(("N", "H", "W"), "3 dimensions"), (("N", 4, "H", "W"), "4 channels")])
def test_an_onnx_network_whose_input_is_not_an_image_is_one_line(tmp_path, photos, tool, shape, said):
    net = _onnx(tmp_path / "net.onnx", shape=shape)
    _one_error_line(TOOLS[tool](net, photos, tmp_path / "out"), tool, 2, str(net), said)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_the_exported_files_whose_cards_are_right_still_restore_and_evaluate(tmp_path, seed_ckpt, photos, tool):
    """The checks refuse only what is wrong: the cards restorer.tools.export writes, and an ONNX file without one."""
    for net in (_safetensors(tmp_path / "net.safetensors", seed_ckpt), _onnx(tmp_path / "net.onnx")):
        p = TOOLS[tool](net, photos, tmp_path / net.suffix)
        assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("tool", TOOLS)
def test_a_torchscript_export_given_as_a_network_is_one_line_that_says_so(tmp_path, photos, tool):
    scripted = torch.jit.script(torch.nn.Conv2d(3, 3, 1))
    net = tmp_path / "net.pt"
    torch.jit.save(scripted, str(net), _extra_files={"restorer.json": '{"in_channels": "three"}'})
    line = _one_error_line(TOOLS[tool](net, photos, tmp_path / "out"), tool, 2, str(net), "TorchScript")
    assert "weights_only" not in line  # torch's own message advises unpickling the file: not safe advice
    assert not (tmp_path / "out").exists()


def _nan_in_one_weight(state: dict) -> None:
    state["base.0.weight"][0, 0, 1, 1] = float("nan")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "onnx"])
def test_weights_that_hold_nan_are_refused_before_any_file_is_written(tmp_path, photos, tool, fmt):
    ckpt = _seed(tmp_path / "nan.pt", damage=_nan_in_one_weight)
    net = {"pt": lambda: ckpt, "safetensors": lambda: _safetensors(tmp_path / "nan.safetensors", ckpt),
           "onnx": lambda: _onnx(tmp_path / "nan.onnx", op="Mul", constant=float("nan"))}[fmt]()
    out = tmp_path / "out"
    _one_error_line(TOOLS[tool](net, photos, out), tool, 2, str(net), "weights are damaged", "NaN")
    assert not out.exists()


def _huge(state: dict) -> None:
    for name in ("base.0.weight", "base.1.weight"):  # 1e20 x 1e20: past float32's 3e38
        state[name].mul_(1e20)


def _overflowing(tmp_path) -> Path:
    """Finite weights whose output is not."""
    return _seed(tmp_path / "huge.pt", damage=_huge)


TRAINED = '{"training": {"qualities": [10, 60]}}'  # as _seed's: restore's guard leaves b.png (no JPEG trace) alone


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_a_restored_image_that_is_not_finite_is_not_written_and_the_run_fails(tmp_path, photos, fmt):
    net = _overflowing(tmp_path) if fmt == "pt" else _onnx(tmp_path / "div0.onnx", TRAINED, op="Div", constant=0.0)
    out = tmp_path / "out"
    p = _restore(net, photos, out)
    assert p.returncode == 1, (p.stdout, p.stderr[-3000:])  # though another file was written
    failures = [line for line in p.stderr.splitlines() if line.startswith("failed ")]
    kind = "NaN" if fmt == "pt" else "inf"  # inf - inf in the next layer; x / 0
    assert failures == [f"failed {photos / 'a.jpg'}: the network's output is not finite ({kind}): its weights are "
                        "damaged or its values overflow"], p.stderr
    assert "Traceback" not in p.stderr and "unchanged 1" in p.stdout and "failed 1" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["b.png"]


@pytest.mark.parametrize("fmt", ["pt", "onnx"])
def test_evaluate_refuses_to_score_an_output_that_is_not_finite(tmp_path, photos, fmt):
    net = _overflowing(tmp_path) if fmt == "pt" else _onnx(tmp_path / "div0.onnx", op="Div", constant=0.0)
    p = _evaluate(net, photos, tmp_path / "eval.json")
    _one_error_line(p, "evaluate", 1, "at quality 30", "the network's output is not finite")
    assert p.stdout == "" and not (tmp_path / "eval.json").exists()

