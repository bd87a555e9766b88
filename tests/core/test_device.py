"""The one device resolver (workers/gpu/device.py) every model worker uses for ``DEVICE``: what each value
means, and a clear ``ConfigError`` for a value that is not a device or names one this machine lacks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from workers.gpu.device import resolve_device

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("setting", ["auto", "AUTO", " auto ", "", None])
def test_auto_is_cuda_when_there_is_one_else_the_cpu(setting):
    assert resolve_device(setting) == torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("setting", ["cpu", "CPU", " cpu\n"])
def test_cpu_is_honoured_everywhere(setting):
    assert resolve_device(setting) == torch.device("cpu")


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "cuda:-1", "cuda0", "mps", "meta", "xpu:0"])
def test_a_value_that_is_not_one_of_ours_is_a_config_error(setting):
    with pytest.raises(ConfigError, match=r"^DEVICE must be auto, cpu, cuda or cuda:N$"):
        resolve_device(setting)


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("setting", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_cuda_device_is_a_config_error(setting):
    with pytest.raises(ConfigError, match="DEVICE asks for CUDA but no CUDA device is available"):
        resolve_device(setting)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_devices_are_honoured_up_to_the_last_one():
    count = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    with pytest.raises(ConfigError, match=f"DEVICE names a CUDA device this machine does not have .it has {count},"):
        resolve_device(f"cuda:{count}")


def test_the_message_never_repeats_the_value():
    with pytest.raises(ConfigError) as caught:
        resolve_device("s3cr3t-looking-value")
    assert "s3cr3t" not in str(caught.value)


def test_importing_the_resolver_does_not_import_torch():
    """The SDXL pipeline module imports it at the top and torch only when it loads."""
    code = "import sys, workers.gpu.device; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("module", ["workers.sdxl.pipeline", "workers.wan.pipeline", "workers.chat.models"])
def test_every_model_worker_resolves_through_it(module):
    imported = __import__(module, fromlist=["resolve_device"])
    assert imported.resolve_device is resolve_device
