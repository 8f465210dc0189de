"""What every benchmark records beside its figures: the machine, the date, and the two files.

A script writes results/<name>.json (the whole document, for tools) and a dated markdown table
(results/<name>_<date>.md unless it names the file otherwise), so a result is found by its
script's name and compared across dates. Dates are UTC.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def today() -> str:
    """The UTC date, 2026-12-06: the dated markdown's name and the date field of most results."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def now() -> str:
    """The UTC date and minute, 2026-12-06 11:30 UTC, for results recorded more than once a day."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine(load_start: float | None = None) -> str:
    """One line on what the figures depend on: CPU model and architecture, cores, OS kernel, the GPUs
    when CUDA has any, the torch version, and the 1-minute load average (of every job on the machine,
    not only the benchmark's), at the start and at the end when `load_start` is given."""
    import torch

    parts = [f"{cpu_model()} ({platform.machine()})", f"{os.cpu_count()} cores",
             f"{platform.system()} {platform.release()}"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    parts.append(f"torch {torch.__version__}")
    load = os.getloadavg()[0]
    parts.append(f"load average {load:.1f}" if load_start is None
                 else f"load average {load_start:.1f} at the start, {load:.1f} at the end")
    return ", ".join(parts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a job the benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(x):
    """JSON for what json.dump does not know: numpy and torch scalars as numbers, the rest as text."""
    try:
        return x.item()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return str(x)


def write_results(name: str, doc: dict, markdown: str, out_dir: str = RESULTS, md_name: str | None = None,
                  indent: int | None = 1) -> tuple[str, str]:
    """Write out_dir/<name>.json and the markdown as out_dir/<name>_<today>.md, or as out_dir/<md_name>
    where a script's dated name differs (an absolute md_name is taken as it is). -> the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{name}.json")
    md_path = os.path.join(out_dir, md_name or f"{name}_{today()}.md")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=indent, default=_plain)
    with open(md_path, "w") as f:
        f.write(markdown)
    return json_path, md_path


def results_at(json_path: str) -> tuple[str, str]:
    """(out_dir, name) of a script's --json path, for write_results."""
    stem = os.path.splitext(os.path.abspath(json_path))[0]
    return os.path.dirname(stem), os.path.basename(stem)
