"""The NBD client driver (DESIGN.md section 3): open_nbd, NBDDevice, states."""

from ..node import Extent
from .driver import ConnectError, DeviceStatistics, NBDDevice, open_nbd
from .states import State

__all__ = ["ConnectError", "DeviceStatistics", "Extent", "NBDDevice", "State", "open_nbd"]
