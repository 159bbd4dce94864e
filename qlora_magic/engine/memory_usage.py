"""Memory readouts: model footprint, GPU allocated/reserved/total, or the process's CPU memory."""

from __future__ import annotations

import gc
from dataclasses import dataclass

from ..display.formatting import Readout, gb


@dataclass(repr=False)  # the repr is Readout's text table
class MemoryReport(Readout):
    """What memory is in use now. Numbers in bytes; None where they do not apply."""

    device: str
    model_footprint: int | None = None
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    gpu_peak: int | None = None
    gpu_total: int | None = None
    cpu_rss: int | None = None
    cpu_total: int | None = None

    title = "Memory"

    def rows(self):
        rows = [("device", self.device)]
        if self.model_footprint is not None:
            rows.append(("model footprint", gb(self.model_footprint)))
        if self.gpu_total is not None:
            rows += [
                ("GPU allocated", gb(self.gpu_allocated)),
                ("GPU reserved", gb(self.gpu_reserved)),
                ("GPU peak allocated", gb(self.gpu_peak)),
                ("GPU total", gb(self.gpu_total)),
            ]
        rows.append(("CPU process (RSS)", f"{gb(self.cpu_rss)} of {gb(self.cpu_total)}"))
        return rows


def memory_report(model=None) -> MemoryReport:
    """Measure memory now. The model (if given) is the one whose footprint is shown."""
    import psutil
    import torch

    device = "cpu"
    if model is not None:
        device = str(next(model.parameters()).device)
    elif torch.cuda.is_available():
        device = "cuda:0"
    report = MemoryReport(device=device)
    if model is not None:
        report.model_footprint = int(model.get_memory_footprint())
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        report.gpu_allocated = torch.cuda.memory_allocated(index)
        report.gpu_reserved = torch.cuda.memory_reserved(index)
        report.gpu_peak = torch.cuda.max_memory_allocated(index)
        report.gpu_total = torch.cuda.get_device_properties(index).total_memory
        report.device = f"{device} ({torch.cuda.get_device_name(index)})"
    report.cpu_rss = psutil.Process().memory_info().rss
    report.cpu_total = psutil.virtual_memory().total
    return report


def release_memory():
    """Give freed tensors back: collect cycles, then empty the CUDA cache if there is one."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
