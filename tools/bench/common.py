"""What every benchmark script records and how it writes its report.

* :func:`machine_info`: platform, CPU model and counts, memory, torch's CPU backends;
* :func:`versions`: torch, megatron-core and transformers;
* :func:`write_report`: the JSON report, written to a temporary file and renamed, so an
  interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def versions() -> dict[str, str]:
    import megatron.core
    import transformers

    return {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__}


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
