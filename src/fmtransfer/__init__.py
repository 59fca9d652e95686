"""fmtransfer: transfer learning from cached pretrained feature maps.

Flow, one package per stage: ``data`` → ``backbone`` → ``cache`` → ``heads`` → ``pipeline`` (regimes)
→ ``cli``. Later stages import earlier ones, never the reverse.
"""

import os

__version__ = "0.1.0"

# oneDNN (PyTorch's CPU convolutions) keeps 1,024 compiled primitives per process by default, one per op, shape, type
# and pass; a comparison's runs need more, so each run evicted what the next one compiled again (a 5-shot fold's
# start pass 1.6x its later passes). Read when oneDNN first compiles, so set on import; a user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")
