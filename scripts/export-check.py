"""The ONNX export checked on every regime that has a cached or live backbone, at a size where pooling is uneven.

python scripts/export-check.py <scratch dir> [image size, default 72]: trains a frozen multilayer, a partial (k=2, 2
cached views) and a finetune run on the embedded digits (3 shots per class), exports each (`make export`) and prints
the largest logit difference between onnxruntime on model.onnx and the rebuilt float32 model on the test images,
and the share of the same predicted class. At 72 px lite0's maps are 36, 18, 9, 5 and 3 px wide: 36, 18 and 9 pooled
to the cache's 8x8 do not divide evenly. (tests/test_deploy.py runs the frozen check at 40 px on every CI run; this
adds the live regimes, whose exports take about a minute each.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fmtransfer.backbone import build_eval_transform
from fmtransfer.cli.common import configure_logging
from fmtransfer.cli.config import compose_config
from fmtransfer.data.images import to_rgb
from fmtransfer.deploy import build_classifier, load_run
from fmtransfer.deploy.export import export_run
from fmtransfer.regimes import load_data, run_regime

REGIMES = (
    ["regime=frozen", "head=multilayer"],
    ["regime=partial", "regime.k=2", "regime.epochs=1", "regime.min_steps=2", "regime.views=2"],
    ["regime=finetune", "regime.epochs=1", "regime.min_steps=2"],
)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    configure_logging("warning")
    tmp, size = Path(argv[0]), argv[1] if len(argv) > 1 else "72"
    common = [f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'logs'}", f"data.image_size={size}"]
    common += ["data.shots_per_class=3", "head.epochs=3", "head.min_steps=0", "trainer.progress_bar=false"]
    for regime in REGIMES:
        run_dir = tmp / regime[0].split("=")[1]
        run_regime(compose_config([*common, *regime]), run_dir)
        run = load_run(run_dir)
        out = export_run(run, tmp / f"export-{run_dir.name}")
        tf = build_eval_transform(run.data_config)
        x = torch.stack([tf(to_rgb(im)) for im in load_data(run.cfg).splits["test"]["image"][:64]])
        session = ort.InferenceSession(str(out / "model.onnx"))
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            reference = build_classifier(run, run_precision=False)(x).numpy()
        same = float((logits.argmax(1) == reference.argmax(1)).mean())
        gap = np.abs(logits - reference).max()
        print(f"{run.regime} at {size} px: max |logit difference| {gap:.2e}, same class {same:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
