"""Where a number was measured: the machine's description, one function for every script and report."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``None``.

    >>> isinstance(cpu_model(), (str, type(None)))
    True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Processor, CPU model, platform, core count, JAX backend and devices, and this process's nice level.

    >>> sorted(machine())[:3]
    ['cpu_count', 'cpu_model', 'jax_backend']
    """
    import jax

    return {"processor": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
            "nice": os.nice(0)}
