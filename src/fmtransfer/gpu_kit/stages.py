"""The GPU report kit's stages, described by data: what each runs, what it carries, how long it is expected to take.

A lent GPU machine has hard limits (read the device tool's README): minutes of device time per session, 10 minutes per
command, a machine that stays warm 30 s after a call, 64 MiB carried per call, 8 files back. Each device stage is
therefore one self-contained command that installs the carried wheels, reads its compact data and leaves one archive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KIT_DIR = ".gpu-kit"  # ignored by git; carried to the device machine
WHEELS = "wheels"
DATA = "data"
CALL_LIMIT_MIB = 64  # the device tool's limit on what travels with one call (working tree + carried paths)
DEADLINE_S = 540  # a device stage stops starting work after this many seconds (the call limit is 600)


@dataclass(frozen=True)
class Experiment:
    """A comparison a stage runs: ``make compare ARGS="experiment=<name> compare.preset=full"``."""

    name: str
    dataset: str  # folder under ../shared/datasets (and under the kit's data/)


@dataclass(frozen=True)
class DeviceStage:
    """One device command: the bench (alone, so its timings are side by side), then groups of comparisons, one group
    after the other; the comparisons of a group run at the same time, each group within its share of the time left."""

    name: str
    bench: bool
    groups: tuple[tuple[Experiment, ...], ...]
    expected_minutes: float
    why: str = ""
    experiments: tuple[Experiment, ...] = field(init=False)
    datasets: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "experiments", tuple(e for group in self.groups for e in group))
        object.__setattr__(self, "datasets", tuple(e.dataset for e in self.experiments))

    @property
    def parallel(self) -> bool:
        return any(len(group) > 1 for group in self.groups)


EXPERIMENTS = {name: Experiment(name, name) for name in ("hymenoptera", "uiuc_texture", "pneumoniamnist")}
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
