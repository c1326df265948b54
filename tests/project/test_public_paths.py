"""Public import paths keep working: what each public module exported before the layout
change (issue 21, from ``__all__`` at 96dfe97) is still exported, by the same name, and
is the same object wherever two modules offer it."""

from __future__ import annotations

import importlib

import pytest

EXPORTED_BEFORE = {
    "blockdrv": [
        "BlockRange", "ConnectError", "ConnectionLostError", "DeadlockError", "Device",
        "DeviceStatistics", "ExportEntry", "ExportInfo", "Extent", "InvalidArgumentError",
        "MultiConnDevice", "NBDAddress", "NBDDevice", "NBDError", "OptionError",
        "ProtocolError", "RequestError", "State", "StateFlag", "TLSError", "TLSMode",
        "UnsupportedError", "__version__", "open_nbd", "parse_uri"],
    "blockdrv.aio": ["AioDevice", "AioDrainedSection", "open_nbd"],
    "blockdrv.sync": ["SyncDevice", "open_nbd"],
    "blockdrv.protocol": [
        "BASE_ALLOCATION", "BlockStatus", "ChunkType", "ClientNegotiator", "Command",
        "CommandFlag", "ConnectionLostError", "ExportDescribed", "ExportEntry", "ExportInfo",
        "ExportsListed", "Goal", "HandshakeFlag", "Info", "InvalidArgumentError",
        "MetaContextsListed", "NBDAddress", "NBDError", "NEED_DATA", "Negotiated", "Option",
        "OptionError", "OptionReply", "ProtocolError", "ReadData", "ReadHole", "ReplyCursor",
        "ReplyDone", "ReplyFlag", "ReplyReader", "ReplyState", "RequestError", "StartTLS",
        "StateFlag", "TLSMode", "TransmissionFlag", "UnsupportedError", "WireErrno",
        "check_request", "parse_uri"],
    "blockdrv.server": ["Backend", "Export", "FailRule", "Faults", "FileBackend",
                        "MemoryBackend", "NBDServer"],
    "blockdrv.block": ["BlockNode", "Bypass", "Extent", "FaultFilter", "FaultRule",
                       "FilterNode", "ThrottleFilter", "TraceFilter", "TraceRecord",
                       "insert_filter", "remove_filter", "replace_node"],
    "blockdrv.nbd": ["ConnectError", "Device", "DeviceStatistics", "Extent",
                     "MultiConnDevice", "NBDDevice", "State", "open_nbd"],
}


@pytest.mark.parametrize("module", sorted(EXPORTED_BEFORE))
def test_what_a_public_module_exported_it_still_exports(module):
    imported = importlib.import_module(module)
    assert set(EXPORTED_BEFORE[module]) <= set(imported.__all__)
    missing = [name for name in EXPORTED_BEFORE[module] if not hasattr(imported, name)]
    assert missing == []


def test_a_name_offered_twice_is_one_object():
    offered: dict[str, object] = {}
    for module, names in EXPORTED_BEFORE.items():
        imported = importlib.import_module(module)
        for name in names:
            if module in ("blockdrv.aio", "blockdrv.sync") or name == "__version__":
                continue  # the facades' own open_nbd
            value = getattr(imported, name)
            assert offered.setdefault(name, value) is value, f"{module}.{name}"
