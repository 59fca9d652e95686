"""Regimes stage: how much of the backbone is trained, each run ending in the same ``metrics.json`` schema.

``frozen``: a head on cached maps; ``partial``: the last k stages + head, from the cached prefix output;
``finetune``: everything, backbone at a lower LR; ``scratch``: same architecture from random init.
"""

from fmtransfer.regimes.common import RunContext, fit_and_evaluate, load_data, start_run
from fmtransfer.regimes.frozen import run_frozen, train_head
from fmtransfer.regimes.live import run_finetune, run_scratch
from fmtransfer.regimes.partial import run_partial

REGIMES = {"frozen": run_frozen, "partial": run_partial, "finetune": run_finetune, "scratch": run_scratch}

__all__ = [
    "REGIMES",
    "RunContext",
    "fit_and_evaluate",
    "load_data",
    "run_finetune",
    "run_frozen",
    "run_partial",
    "run_scratch",
    "start_run",
    "train_head",
]
