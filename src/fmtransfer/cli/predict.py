"""``make predict ARGS="run=<run dir> data.path=<images>"``: classify images with a finished run.

Options (``key=value``): ``run`` (required), ``data.path`` (required: a flat folder of images, an ImageFolder, a CSV,
...), ``data.csv_columns.image|label|split`` (a CSV's column names, as in ``make train``), ``out`` (default
``<run dir>/predictions/<input name>/predictions.csv``), ``batch_size`` (64), ``num_workers`` (0). Prints
``predictions: <path>`` last.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fmtransfer.cli.common import quiet_libraries, user_errors
from fmtransfer.errors import ConfigError

CSV_COLUMN_OPTIONS = ("data.csv_columns.image", "data.csv_columns.label", "data.csv_columns.split")
OPTIONS = {"run": str, "data.path": str, "out": str, "batch_size": int, "num_workers": int}
OPTIONS |= dict.fromkeys(CSV_COLUMN_OPTIONS, str)


def parse_options(argv: list[str], required: tuple[str, ...], options: dict[str, type] = OPTIONS) -> dict:
    """``key=value`` arguments as a dict, each known, typed and given once; ``required`` keys must be there."""
    out: dict = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ConfigError(f"{arg!r}: expected one of {', '.join(f'{k}=...' for k in options)}.")
        try:
            out[key] = options[key](value)
        except ValueError as exc:
            raise ConfigError(f"{key}={value}: not a valid {options[key].__name__}.") from exc
    missing = [k for k in required if k not in out]
    if missing:
        raise ConfigError(
            f'missing {", ".join(f"{k}=..." for k in missing)} (e.g. ARGS="run=<run dir> data.path=<images>").'
        )
    return out


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.deploy import load_run
    from fmtransfer.deploy.predict import predict

    quiet_libraries()
    with user_errors():
        opts = parse_options(list(sys.argv[1:] if argv is None else argv), ("run", "data.path"))
        run = load_run(opts["run"])
        name = Path(opts["data.path"].rstrip("/")).stem or "input"
        out = Path(opts.get("out") or run.path / "predictions" / name / "predictions.csv")
        columns = {k.rsplit(".", 1)[1]: opts[k] for k in CSV_COLUMN_OPTIONS if k in opts}
        path = predict(run, opts["data.path"], out, opts.get("batch_size", 64), opts.get("num_workers", 0), columns)
    print(f"predictions: {path.resolve()}")


if __name__ == "__main__":
    main()
