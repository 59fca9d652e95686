"""Regimes stage: how much of the backbone is trained, each run ending in the same ``metrics.json`` schema.

Each regime is a config of the ``regime/`` group whose ``_target_`` is its class here:
``frozen``: a head on cached maps; ``partial``: the last k stages + head, from the cached prefix output;
``finetune``: everything, backbone at a lower LR; ``scratch``: same architecture from random init; between frozen
and finetune (``efficient.py``): ``bitfit`` (biases and norms), ``lora`` (peft adapters), ``surgical`` (one block, or
Auto-RGN).
"""

from fmtransfer.regimes.context import RunContext, load_data, start_run
from fmtransfer.regimes.efficient import BitFitRegime, LoraRegime, SurgicalRegime
from fmtransfer.regimes.frozen import FrozenRegime, HeadSettings, fit_head
from fmtransfer.regimes.live import FinetuneRegime, ScratchRegime
from fmtransfer.regimes.partial import PartialRegime
from fmtransfer.regimes.run import Regime, for_run_dir, run_regime, with_regime

__all__ = [
    "BitFitRegime",
    "FinetuneRegime",
    "FrozenRegime",
    "HeadSettings",
    "LoraRegime",
    "PartialRegime",
    "Regime",
    "RunContext",
    "ScratchRegime",
    "SurgicalRegime",
    "fit_head",
    "for_run_dir",
    "load_data",
    "run_regime",
    "start_run",
    "with_regime",
]
