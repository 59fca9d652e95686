"""The GPU report kit (``make gpu-report STAGE=...``): evidence from a lent GPU machine within its limits.

plan -> pack (here) -> device stages (there, one archive each) -> unpack (here); ``rehearse`` runs it all on the CPU.
"""

from fmtransfer.gpu_kit.stages import DEVICE_STAGES, LOCAL_STAGES, device_command

__all__ = ["DEVICE_STAGES", "LOCAL_STAGES", "device_command"]
