"""Where the numbers were measured: device, library versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytorch_lightning
import timm
import torch


def git_commit(root: Path) -> str:
    """HEAD (``-dirty`` with uncommitted changes); ``FMTRANSFER_COMMIT`` wins: a copy of the tree (the GPU kit's device
    machine) may carry no ``.git`` or a stale one, and whoever copied it knows the commit."""
    if os.environ.get("FMTRANSFER_COMMIT"):
        return os.environ["FMTRANSFER_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_environment(root: Path) -> dict:
    """Device and versions, recorded with every report."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "accelerator": "gpu" if cuda else "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(root),
    }
