"""The NBD client driver (DESIGN.md section 3): open_nbd, NBDDevice, states."""

from ..block.node import Extent
from ..protocol.errors import ConnectError
from .device import DeviceStatistics, NBDDevice
from .multiconn import MultiConnDevice
from .open import Device, open_nbd
from .states import State

__all__ = ["ConnectError", "Device", "DeviceStatistics", "Extent", "MultiConnDevice",
           "NBDDevice", "State", "open_nbd"]
