"""Energy and memory per batch: what the offline evaluation needs for the paper's cost columns.

Energy comes from a cumulative hardware counter read before and after a batch:
- on a GPU, NVML's total-energy counter (millijoules since the driver loaded; Volta and newer);
- on a CPU, Intel RAPL under /sys/class/powercap (microjoules; root-only on most kernels
  since 2020, so often unreadable);
- otherwise there is no meter and energy is None (never a made-up number).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

POWERCAP_ROOT = Path("/sys/class/powercap")


class EnergyMeter(Protocol):
    """A cumulative energy counter in joules; differences between two reads are what count."""

    source: str

    def read_joules(self) -> float: ...


class NvmlEnergyMeter:
    """Sum of NVML's total-energy counters of the GPUs a model uses."""

    source = "nvml"

    def __init__(self, gpu_indices: list[int]) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in gpu_indices]
        self.read_joules()  # fails here, at start-up, on GPUs without the counter

    def read_joules(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000.0


@dataclass(frozen=True)
class RaplZone:
    energy_file: Path
    max_energy_uj: int


class RaplEnergyMeter:
    """Sum of the top-level RAPL package zones (intel-rapl:N), each corrected for wrap-around.

    Sub-zones (intel-rapl:N:M: cores, dram) are inside their package and would count twice.
    """

    source = "rapl"

    def __init__(self, zones: list[RaplZone]) -> None:
        if not zones:
            raise ValueError("no RAPL zones")
        self.zones = zones
        self.last_uj = [self._read_uj(zone) for zone in zones]
        self.total_uj = 0

    @classmethod
    def from_powercap(cls, root: Path = POWERCAP_ROOT) -> RaplEnergyMeter | None:
        """The meter of this machine's packages, or None when RAPL is absent or unreadable."""
        zones = []
        for zone_dir in sorted(root.glob("intel-rapl:*")):
            if zone_dir.name.count(":") != 1:
                continue
            try:
                zones.append(RaplZone(zone_dir / "energy_uj", int((zone_dir / "max_energy_range_uj").read_text())))
                int((zone_dir / "energy_uj").read_text())
            except (OSError, ValueError):
                return None
        return cls(zones) if zones else None

    @staticmethod
    def _read_uj(zone: RaplZone) -> int:
        return int(zone.energy_file.read_text())

    def read_joules(self) -> float:
        for index, zone in enumerate(self.zones):
            now = self._read_uj(zone)
            delta = now - self.last_uj[index]
            if delta < 0:  # the counter wrapped past max_energy_range_uj
                delta += zone.max_energy_uj
            self.total_uj += delta
            self.last_uj[index] = now
        return self.total_uj / 1_000_000


def open_energy_meter(device: torch.device, gpu_indices: list[int] | None = None) -> EnergyMeter | None:
    """The energy meter for a model on `device`, or None (logged once) when none can be read."""
    if device.type == "cuda":
        indices = gpu_indices if gpu_indices is not None else [device.index or 0]
        try:
            return NvmlEnergyMeter(indices)
        except Exception as exc:  # pynvml raises NVMLError subclasses, or ImportError without a driver
            log.warning("no GPU energy counter (%s): energy per request will be None", exc)
            return None
    meter = RaplEnergyMeter.from_powercap()
    if meter is None:
        log.info("RAPL is not readable under %s: energy per request will be None", POWERCAP_ROOT)
    return meter


@dataclass(frozen=True)
class BatchCost:
    energy_j: float | None
    gpu_memory_mb: float | None


class CostMeter:
    """Measures one batch at a time: energy from the meter and the peak GPU memory."""

    def __init__(self, device: torch.device, energy: EnergyMeter | None) -> None:
        self.device = device
        self.energy = energy
        self._start_j: float | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start_j = self.energy.read_joules() if self.energy is not None else None

    def stop(self) -> BatchCost:
        energy_j = None
        if self.energy is not None and self._start_j is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the counter must include the kernels just queued
            energy_j = self.energy.read_joules() - self._start_j
        memory_mb = None
        if self.device.type == "cuda":
            memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        return BatchCost(energy_j, memory_mb)
