"""fmtransfer: transfer learning from cached pretrained feature maps.

Flow, one package per stage: ``data`` → ``backbone`` → ``cache`` → ``heads`` → ``pipeline`` (regimes)
→ ``cli``. Later stages import earlier ones, never the reverse.
"""

__version__ = "0.1.0"
