"""The NBD client driver (DESIGN.md section 3): open_nbd, NBDDevice, states."""

from .driver import ConnectError, DeviceStatistics, Extent, NBDDevice, open_nbd
from .states import State

__all__ = ["ConnectError", "DeviceStatistics", "Extent", "NBDDevice", "State", "open_nbd"]
