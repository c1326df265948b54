"""The NBD client driver (DESIGN.md section 3): open_nbd, NBDDevice, states."""

from ..node import Extent
from .driver import ConnectError, Device, DeviceStatistics, NBDDevice, open_nbd
from .multiconn import MultiConnDevice
from .states import State

__all__ = ["ConnectError", "Device", "DeviceStatistics", "Extent", "MultiConnDevice",
           "NBDDevice", "State", "open_nbd"]
