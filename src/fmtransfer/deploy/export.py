"""``make export``: a finished run as a self-contained, deployable model.

The export dir holds ``model.onnx`` and ``model.pt2`` (``torch.export``): image tensor ``[N, 3, H, W]`` in (the
run's preprocessing applied), logits out, one graph: backbone, the cache's pooling and dtype for cached regimes, the
head with its feature normalisation. ``labels.json`` lists the class names in logit order; ``preprocessing.json`` says
how images became 8-bit RGB (``to_rgb``) and holds the arguments of timm's eval transform (``timm_transform``:
``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``); ``source.json`` names the run
and its precisions: the graph computes in float32, the run in ``run_precision`` (a bf16 run's logits differ from the
graph's by bf16 rounding).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from fmtransfer.deploy.model import build_classifier
from fmtransfer.deploy.rundir import FinishedRun
from fmtransfer.errors import FmtransferError

OPSET = 18
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# How the run turned every image into 8-bit RGB before the timm transform (fmtransfer.data.images.to_rgb).
RGB_CONVERSION = (
    "8-bit RGB: grayscale and palette images converted; transparent pixels (RGBA, LA, PA, palette transparency) "
    "composited onto white; 16/32-bit grayscale rescaled by its maximum to 0-255 before conversion"
)


def export_run(run: FinishedRun, out: Path) -> Path:
    """Write the export dir ``out`` (replacing an older export there; nothing half-written is left in its place)."""
    try:
        import onnx  # noqa: F401 - the exporter needs it; fail with the fix rather than deep inside torch
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise FmtransferError(
            f"make export needs onnx and onnxscript ({exc}); run `make venv` to install them."
        ) from exc
    model = build_classifier(run, run_precision=False).float().eval()
    size = tuple(int(v) for v in run.data_config["input_size"])
    example = torch.zeros(2, *size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp / "model.pt2")
            onnx_program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
            )
        onnx_program.save(str(tmp / "model.onnx"))
        (tmp / "labels.json").write_text(json.dumps(run.class_names, indent=2))
        preprocessing = {
            "to_rgb": RGB_CONVERSION,
            "timm_transform": {k: _plain(run.data_config.get(k)) for k in PREPROCESSING_KEYS},
        }
        (tmp / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
        source = {"run": str(run.path.resolve()), "regime": run.regime, "backbone": run.spec.name}
        source |= {"run_precision": run.precision, "graph_precision": "float32"}
        (tmp / "source.json").write_text(json.dumps(source, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
