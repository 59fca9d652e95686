"""``make export ARGS="run=<run dir>"``: the run as ``model.onnx`` + ``model.pt2`` (torch.export), ``labels.json``
and ``preprocessing.json`` in an export dir (``out=...``, default ``<run dir>/export``). Prints ``export dir: <path>``
last."""

from __future__ import annotations

import sys
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.cli.predict import parse_options


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.deploy import load_run
    from fmtransfer.deploy.export import export_run

    quiet_libraries()
    with user_errors():
        opts = parse_options(list(sys.argv[1:] if argv is None else argv), ("run",), {"run": str, "out": str})
        run = load_run(opts["run"])
        out = export_run(run, Path(opts.get("out") or run.path / "export"))
    print(f"export dir: {out.resolve()}")


if __name__ == "__main__":
    main()
