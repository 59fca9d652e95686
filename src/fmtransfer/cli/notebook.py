"""``make notebook``: execute notebooks/feature_maps.ipynb headless with your overrides; writes .ipynb and .html."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from fmtransfer.cli.common import configure_logging
from fmtransfer.cli.config import config_dir

log = logging.getLogger(__spec__.name)  # not __name__: "__main__" under python -m, outside fmtransfer's logger

NOTEBOOK = config_dir().parent / "notebooks" / "feature_maps.ipynb"


def execute_notebook(overrides: list[str], out_dir: Path, timeout: int | None = None) -> tuple[Path, Path]:
    """Run the notebook (parameters injected after its ``parameters`` cell, as papermill does); returns the
    executed ``.ipynb`` and its ``.html``.

    Cells run without a time limit by default (``timeout`` seconds per cell otherwise): how long a cell takes depends
    on the dataset, the cache and how busy the machine is, so a fixed limit would turn a slow machine into a failure.
    Each cell's start and time are logged instead, so progress shows.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = f"# Injected parameters\noverrides = {json.dumps(overrides)}\nout_dir = {json.dumps(str(out_dir))}"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    out_dir.mkdir(parents=True, exist_ok=True)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    began: dict[int, float] = {}

    def cell_started(cell, cell_index, **_):
        began[cell_index] = time.perf_counter()
        log.info(f"cell {code.index(cell_index) + 1}/{len(code)} running: {cell.source.splitlines()[0][:70]}")

    def cell_done(cell, cell_index, **_):
        log.info(
            f"cell {code.index(cell_index) + 1}/{len(code)} done in {time.perf_counter() - began[cell_index]:.1f} s"
        )

    NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[1])}},
        on_cell_execute=cell_started,
        on_cell_executed=cell_done,
    ).execute()
    ipynb = out_dir / "feature_maps.ipynb"
    nbformat.write(nb, ipynb)
    html = out_dir / "feature_maps.html"
    html.write_text(HTMLExporter().from_notebook_node(nb)[0])
    return ipynb, html


def main(argv: list[str] | None = None) -> None:
    from fmtransfer.cli.config import compose_config

    configure_logging()
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = compose_config(overrides, name="analyze")
    out_dir = Path(cfg.paths.log_dir) / "notebook" / time.strftime("%Y-%m-%d_%H-%M-%S")
    ipynb, html = execute_notebook(overrides, out_dir)
    print(f"executed notebook: {ipynb}\nhtml: {html}")
    print(f"notebook dir: {out_dir.resolve()}")


if __name__ == "__main__":
    main()
