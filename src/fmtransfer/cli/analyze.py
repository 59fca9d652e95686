"""``make analyze``: figures and ``analysis.md`` for a cache; prints ``analysis dir: <path>`` last."""

from __future__ import annotations

import sys
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.cli.config import compose_config


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.analysis.run import run_analysis

    quiet_libraries()
    with user_errors():
        cfg = compose_config(list(sys.argv[1:] if argv is None else argv), name="analyze")
        out_dir = Path(cfg.analysis.out_dir)
        run_analysis(cfg, out_dir)
    print(f"analysis dir: {out_dir.resolve()}")


if __name__ == "__main__":
    main()
