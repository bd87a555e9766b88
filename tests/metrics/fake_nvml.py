"""A stand-in for ``pynvml`` after ``nvmlInit``: the functions ``GpuCollector`` calls, over fixed readings.

``devices[i]`` holds NVML device *i*'s readings; a reading set to ``None`` raises ``NVMLError`` as an
unsupported query does on a real GPU (power on some boards, utilisation under MIG)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


@dataclass
class Device:
    total: int
    used: int
    utilization: int | None = 50
    temperature: int | None = 60
    power_mw: int | None = 250_000


class FakeNvml:
    """pynvml's function names, as GpuCollector calls them."""

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError

    def __init__(self, devices: list[Device]):
        self.devices = devices

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        return self.devices[index]

    def nvmlDeviceGetMemoryInfo(self, device: Device) -> SimpleNamespace:
        return SimpleNamespace(total=device.total, used=device.used, free=device.total - device.used)

    def nvmlDeviceGetUtilizationRates(self, device: Device) -> SimpleNamespace:
        return SimpleNamespace(gpu=_supported(device.utilization), memory=0)

    def nvmlDeviceGetTemperature(self, device: Device, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return _supported(device.temperature)

    def nvmlDeviceGetPowerUsage(self, device: Device) -> int:
        return _supported(device.power_mw)


def _supported(reading: int | None) -> int:
    if reading is None:
        raise NVMLError("Not Supported")
    return reading
