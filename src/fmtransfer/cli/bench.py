"""``make bench``: prints the figures as a table and ``bench: <path to bench.json>`` last."""

from __future__ import annotations

import sys
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.cli.config import compose_config


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.bench import bench_table, run_bench

    quiet_libraries()
    with user_errors():
        cfg = compose_config(list(sys.argv[1:] if argv is None else argv), name="bench")
        out_dir = Path(cfg.bench.out_dir)
        result = run_bench(cfg, out_dir)
    print(bench_table(result))
    print(f"bench: {(out_dir / 'bench.json').resolve()}")


if __name__ == "__main__":
    main()
