"""``make gpu-report STAGE=unpack FILE=<archive>``: a device stage's archive laid into the committed layout.

- each comparison -> ``reports/<experiment>-<gpu>/`` (report.md, report.html, results.json, config.yaml, figures/,
  plus ``gpu-report.json``: the stage's command, wall time and exit status);
- the stage's bench table and wall times -> a section of ``docs/benchmarks.md`` with the device named, between
  markers, so unpacking again replaces it instead of adding a copy.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from fmtransfer.errors import FmtransferError
from fmtransfer.gpu_kit.device import REPORT_FILES

BENCHMARKS = Path("docs/benchmarks.md")
GPU_HEADING = "## GPU"


def device_slug(device: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200"; a CPU rehearsal -> "cpu"."""
    if device.startswith("CPU"):
        return "cpu"
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", device)
    return (model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")).lower()


def read_archive(archive: Path, into: Path) -> dict:
    """Extract ``archive`` into ``into`` and return its manifest (a clear error for anything else)."""
    if not archive.is_file():
        raise FmtransferError(f"unpack: FILE={archive} does not exist (the device tool's files_at folder holds it).")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(into, filter="data")
    except tarfile.TarError as exc:
        raise FmtransferError(f"unpack: FILE={archive} is not a gpu-report archive ({exc}).") from exc
    manifest = into / "manifest.json"
    if not manifest.is_file():
        raise FmtransferError(f"unpack: FILE={archive} has no manifest.json; it was not written by a device stage.")
    return json.loads(manifest.read_text())


def lay_out_report(source: Path, dest: Path, job: dict) -> Path:
    """One comparison's files into ``dest`` (replaced whole, so no file of an older report survives)."""
    missing = [name for name in REPORT_FILES if not (source / name).is_file()]
    if missing:
        raise FmtransferError(f"unpack: {source.name} has no {missing} (its job: {job}); nothing laid out for it.")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in REPORT_FILES:
        shutil.copy2(source / name, tmp / name)
    if (source / "figures").is_dir():
        shutil.copytree(source / "figures", tmp / "figures")
    (tmp / "gpu-report.json").write_text(json.dumps(job, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def correct_commit(folder: Path, manifest: dict) -> None:
    """Archives from kits before FMTRANSFER_COMMIT won over git: the device's stale ``.git`` named another commit than
    the one the kit was packed at (whose tree the device ran); name the packed one in every text file."""
    packed, seen = manifest.get("kit", {}).get("commit"), manifest["environment"]["git_commit"]
    if not packed or packed == seen:
        return
    for path in folder.rglob("*"):
        if path.suffix in (".json", ".md", ".html", ".yaml", ".log"):
            path.write_text(path.read_text().replace(seen, packed))
    manifest["environment"]["git_commit"] = packed


def together_text(groups: list[list[str]]) -> str:
    """Which comparisons shared the machine (their wall times are not solo times)."""
    shared = [" and ".join(g) for g in groups if len(g) > 1]
    return f" ({'; '.join(shared)} ran at the same time, sharing the GPU and the CPU cores)." if shared else "."


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def benchmark_section(manifest: dict, bench: dict | None, reports: dict[str, dict]) -> str:
    """The markdown of one stage's section: device, versions, the bench table, the comparisons' times and verdicts."""
    from fmtransfer.bench import bench_table

    env = manifest["environment"]
    jobs = manifest["jobs"]
    lines = [
        f"### {env['device']}: `make gpu-report STAGE={manifest['stage']}`",
        "",
        f"Environment: {env['device']}, {env['cpu_count']} CPU cores; Python {env['python']}, torch {env['torch']}, "
        f"timm {env['timm']}, pytorch-lightning {env['pytorch_lightning']}; commit {env['git_commit']}. Stage wall "
        f"time {minutes(manifest['wall_seconds'])}"
        # Archives before stages had groups: "parallel" meant all comparisons at once.
        + together_text(manifest.get("groups") or ([list(jobs)[1:]] if manifest["parallel"] else [])),
        "",
    ]
    if bench is None and "bench" in jobs:
        job = jobs["bench"]
        lines += [
            f"`make bench`: no figures (exit {job['returncode']} after {minutes(job['seconds'])}); "
            "its log is in the archive.",
            "",
        ]
    if bench is not None:
        job = jobs["bench"]
        lines += [f'`make bench ARGS="{job["command"].split(" ", 1)[1]}"` ({minutes(job["seconds"])}):', ""]
        lines += ["```text", bench_table(bench), "```", ""]
        target = bench.get("extract_predecoded_images_per_s")
        if target is not None and "extract_predecoded_images_per_s" not in bench["targets"]:
            lines += [f"`extract_predecoded_images_per_s` = {target} (the >= 5,000 target is set for an H100).", ""]
    if reports:
        lines += [
            "| comparison (full preset) | wall time | exit | verdict (test split, mean over seeds) |",
            "| --- | --- | --- | --- |",
        ]
        for name, results in reports.items():
            job = jobs[name]
            status = "stopped at the deadline" if job["timed_out"] else str(job["returncode"])
            v = results.get("verdict") or {}
            winner = v.get("winner", "-")
            acc = results["summary"].get(winner, {}).get(v.get("shots"), {}).get("test", {}).get("acc", {})
            said = (
                f"{winner} ({acc.get('mean', float('nan')):.3f} ± {acc.get('std', float('nan')):.3f})"
                if acc
                else winner
            )
            not_run = len(results.get("not_run", []))
            said += f"; {not_run} planned runs not run (time budget)" if not_run else ""
            lines.append(f"| `{name}` | {minutes(job['seconds'])} | {status} | {said} |")
        lines.append("")
    failed = [n for n, j in jobs.items() if n != "bench" and n not in reports]
    for name in failed:
        job = jobs[name]
        lines += [
            f"`{name}`: no report (exit {job['returncode']}, timed out: {job['timed_out']}); "
            "its log is in the archive.",
            "",
        ]
    return "\n".join(lines)


def replace_section(text: str, key: str, body: str) -> str:
    """``text`` with the section between ``<!-- gpu-report:key -->`` markers replaced (or added under ## GPU)."""
    start, end = f"<!-- gpu-report:{key} start -->", f"<!-- gpu-report:{key} end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    if GPU_HEADING in text:
        at = text.index(GPU_HEADING) + len(GPU_HEADING)
        at = text.index("\n", at) + 1
        return text[:at] + "\n" + block + "\n" + text[at:]
    return text.rstrip() + f"\n\n{GPU_HEADING}\n\n{block}\n"


def unpack(archive: Path, root: Path, dest: Path) -> dict:
    """Lay ``archive`` out under ``dest`` (the repository root, or a rehearsal's folder); returns what was written."""
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as tmp:
        manifest = read_archive(archive, Path(tmp))
        correct_commit(Path(tmp), manifest)
        slug = device_slug(manifest["environment"]["device"])
        reports: dict[str, dict] = {}
        written = []
        for name, job in manifest["jobs"].items():
            source = Path(tmp) / name
            if name == "bench" or not (source / "results.json").is_file():
                continue
            out = lay_out_report(source, dest / "reports" / f"{name}-{slug}", job)
            reports[name] = json.loads((out / "results.json").read_text())
            written.append(str(out))
        bench_file = Path(tmp) / "bench" / "bench.json"
        bench = json.loads(bench_file.read_text()) if bench_file.is_file() else None
        doc = dest / BENCHMARKS
        if not doc.is_file():
            doc.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / BENCHMARKS, doc)
        section = benchmark_section(manifest, bench, reports)
        doc.write_text(replace_section(doc.read_text(), f"{slug}:{manifest['stage']}", section))
        written.append(str(doc))
    return {"device": slug, "stage": manifest["stage"], "written": written}
