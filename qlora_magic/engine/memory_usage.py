"""Memory readouts: model footprint, GPU allocated/reserved/total, or the process's CPU memory; what an
unload freed."""

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


@dataclass(repr=False)
class UnloadReport(Readout):
    """What unloading the model gave back: memory measured before and after, in bytes. `unloaded` names the
    model and its quantization; None when no model was loaded (then nothing was measured)."""

    unloaded: str | None
    before: MemoryReport | None = None
    after: MemoryReport | None = None

    title = "Model unloaded"
    NOTHING = "No model is loaded: nothing to unload."

    @property
    def on_gpu(self) -> bool:
        return self.before is not None and self.before.gpu_total is not None and self.after.gpu_total is not None

    @property
    def freed(self) -> int:
        """GPU memory allocated on a GPU, the process's RSS on the CPU (where the allocator may keep some pages
        for reuse); 0 when nothing was loaded."""
        if self.unloaded is None:
            return 0
        if self.on_gpu:
            return self.before.gpu_allocated - self.after.gpu_allocated
        return self.before.cpu_rss - self.after.cpu_rss

    def rows(self):
        def change(field):
            return f"{gb(getattr(self.before, field))} -> {gb(getattr(self.after, field))}"

        rows = [("model", self.unloaded), ("model footprint", gb(self.before.model_footprint))]
        if self.on_gpu:
            rows += [("GPU allocated", change("gpu_allocated")), ("GPU reserved", change("gpu_reserved"))]
        rows.append(("CPU process (RSS)", change("cpu_rss")))
        rows.append(("freed", f"{gb(max(self.freed, 0))} of {'GPU' if self.on_gpu else 'process'} memory"))
        return rows

    def __repr__(self):
        return self.NOTHING if self.unloaded is None else super().__repr__()

    def _repr_html_(self):
        return f"<div class='qlora-readout'>{self.NOTHING}</div>" if self.unloaded is None else super()._repr_html_()


def devices_of(model) -> list[str]:
    """The devices a model's layers are on, in order: one, unless it was loaded with --device-map auto."""
    placed = getattr(model, "hf_device_map", None) or getattr(getattr(model, "base_model", None), "hf_device_map", None)
    if not placed:
        return [str(next(model.parameters()).device)]
    names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()]
    return list(dict.fromkeys(names))


def memory_report(model=None) -> MemoryReport:
    """Measure memory now. The model (if given) is the one whose footprint is shown."""
    import psutil
    import torch

    device = "cpu"
    if model is not None:
        device = str(next(model.parameters()).device)
        spread = devices_of(model)
        if len(spread) > 1:  # --device-map auto: the first GPU's numbers below, the model's devices named
            device = ", ".join(spread)
    elif torch.cuda.is_available():
        device = "cuda:0"
    report = MemoryReport(device=device)
    if model is not None:
        report.model_footprint = int(model.get_memory_footprint())
    if device.startswith("cuda"):
        index = torch.device(device.split(",")[0]).index or 0
        report.gpu_allocated = torch.cuda.memory_allocated(index)
        report.gpu_reserved = torch.cuda.memory_reserved(index)
        report.gpu_peak = torch.cuda.max_memory_allocated(index)
        report.gpu_total = torch.cuda.get_device_properties(index).total_memory
        report.device = f"{device} ({torch.cuda.get_device_name(index)})"
    report.cpu_rss = psutil.Process().memory_info().rss
    report.cpu_total = psutil.virtual_memory().total
    return report


def release_memory(workspaces: bool = False):
    """Give freed tensors back: collect cycles, then empty the CUDA cache if there is one. `workspaces`: also
    cuBLAS's per-stream workspaces (64 MiB on an H200, kept for the process's life otherwise), as when the
    model itself goes (unload): the next matmul makes them again."""
    gc.collect()
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        if workspaces and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
