"""The GPU report kit's stages, described by data: what each runs, what it carries, how long it is expected to take.

A lent GPU machine has hard limits (read the device tool's README): minutes of device time per session, 10 minutes per
command, a machine that stays warm 30 s after a call, 64 MiB carried per call, 8 files back. Each device stage is
therefore one self-contained command that installs the carried wheels, reads its compact data and leaves one archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIT_DIR = ".gpu-kit"  # ignored by git; carried to the device machine
WHEELS = "wheels"
EXTRA_WHEELS = "wheels-extra"  # wheels only some stages need, carried by those alone
DATA = "data"
CALL_LIMIT_MIB = 64  # the device tool's limit on what travels with one call (working tree + carried paths)
DEADLINE_S = 540  # a device stage stops starting work after this many seconds (the call limit is 600)


@dataclass(frozen=True)
class Experiment:
    """A comparison a stage runs: ``make compare ARGS="experiment=<config or name> compare.preset=full <overrides>"``,
    its report laid out as ``reports/<name>-<gpu>/``."""

    name: str
    dataset: str  # folder under ../shared/datasets (and under the kit's data/)
    config: str = ""  # configs/experiment/<config>.yaml ("": the name)
    overrides: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()  # what it needs beyond the kit's own wheels (in EXTRA_WHEELS)

    @property
    def arguments(self) -> list[str]:
        return [f"experiment={self.config or self.name}", *self.overrides]


@dataclass(frozen=True)
class DeviceStage:
    """One device command: the bench (alone, so its timings are side by side), then groups of comparisons, one group
    after the other; the comparisons of a group run at the same time, taking their runs' turns from the device's run
    slots (``RunSlots``), each group within its share of the time left."""

    name: str
    bench: bool
    groups: tuple[tuple[Experiment, ...], ...]
    expected_minutes: float
    why: str = ""
    experiments: tuple[Experiment, ...] = field(init=False)
    datasets: tuple[str, ...] = field(init=False)
    packages: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "experiments", tuple(e for group in self.groups for e in group))
        object.__setattr__(self, "datasets", tuple(dict.fromkeys(e.dataset for e in self.experiments)))
        object.__setattr__(self, "packages", tuple(dict.fromkeys(p for e in self.experiments for p in e.packages)))

    def carried(self) -> list[str]:
        """The kit paths one call of this stage carries (relative to the kit folder)."""
        return ["kit.json", WHEELS, *([EXTRA_WHEELS] if self.packages else []), *(f"{DATA}/{d}" for d in self.datasets)]

    @property
    def parallel(self) -> bool:
        return any(len(group) > 1 for group in self.groups)


# regime=lora imports peft, which imports these (measured: sys.modules after importing what backbone/tuning.py uses);
# the rest of what it imports (numpy, packaging, PyYAML, safetensors, huggingface-hub, tqdm, filelock, fsspec, jinja2)
# comes with the device image's torch and timm, or with the kit's datasets.
LORA_PACKAGES = ("peft", "transformers", "accelerate", "tokenizers", "regex", "psutil")
EXPERIMENTS = {
    **{name: Experiment(name, name) for name in ("hymenoptera", "uiuc_texture", "pneumoniamnist")},
    # The regimes between frozen and full fine-tuning, in their own call: peft's wheels and three datasets do not fit
    # in one call's 64 MiB (78 MiB measured).
    "hymenoptera-efficient": Experiment(
        "hymenoptera-efficient",
        "hymenoptera",
        config="hymenoptera",
        overrides=("compare.regimes=[frozen,bitfit,lora,surgical]", "compare.name=hymenoptera-efficient"),
        packages=LORA_PACKAGES,
    ),
}
DATASETS = tuple(dict.fromkeys(e.dataset for e in EXPERIMENTS.values()))
COMPARISON = "full-preset comparison"

# Registry of device stages. Expected minutes: estimates for one H100/H200 (measured runs: docs/benchmarks.md).
DEVICE_STAGES = {
    "bench": DeviceStage(
        "bench", True, (), 2.0, why="make bench at 224 px, bf16-mixed, NHWC, pinned memory, 8 workers"
    ),
    **{name: DeviceStage(name, False, ((e,),), 5.0, why=COMPARISON) for name, e in EXPERIMENTS.items()},
    # For a session with time for one machine start (15 minutes of device time): the bench, then hymenoptera alone
    # (its wall time is the H100 target's), then the other two at once (the GPU and 16 cores have room for both).
    "all": DeviceStage(
        "all",
        True,
        ((EXPERIMENTS["hymenoptera"],), (EXPERIMENTS["uiuc_texture"], EXPERIMENTS["pneumoniamnist"])),
        9.0,
        why="bench, hymenoptera alone, then uiuc_texture + pneumoniamnist at once: one machine start",
    ),
}

LOCAL_STAGES = ("plan", "pack", "unpack", "rehearse")


def device_command(stage: str) -> str:
    """The shell command to give the device tool's ``run`` for ``stage``."""
    return f"bash scripts/gpu-stage {stage}"
