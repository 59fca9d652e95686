"""``make analyze``: figures and ``analysis.md`` for a cache; prints ``analysis dir: <path>`` last."""

from __future__ import annotations

import sys
from pathlib import Path

from fmtransfer.cli.config import compose_config
from fmtransfer.cli.quiet import quiet_libraries
from fmtransfer.errors import FmtransferError


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.analysis.run import run_analysis

    quiet_libraries()
    try:
        cfg = compose_config(list(sys.argv[1:] if argv is None else argv), name="analyze")
        out_dir = Path(cfg.analysis.out_dir)
        run_analysis(cfg, out_dir)
    except FmtransferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"analysis dir: {out_dir.resolve()}")


if __name__ == "__main__":
    main()
