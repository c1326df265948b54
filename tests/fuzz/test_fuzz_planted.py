"""The fuzzer's new invariants catch the bugs they are for: each test plants one (the
defect as it once shipped), runs a short fuzz run, expects the right violation, writes
the reproducer, and replays it (``blockdrv-fuzz --replay``) to the same violation.

Each run is a child process that plants the bug (a monkeypatch) and then runs
``FuzzRun`` or the command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from blockdrv.nbd import admission, connection, dispatch
from blockdrv.protocol import negotiate, replies
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop


def plant_newcomers_jump_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission as it was: a freed place is announced, not handed over, and goes to
    whoever asks first; a woken waiter that lost the race parks again, at the back."""
    Admission = admission.Admission

    async def enter(self):  # type: ignore[no-untyped-def]
        if self.try_enter():
            return False
        token = self.monitor.parked() if self.monitor else None
        while True:
            await self._queue.park()
            if self._may_admit(self.admitted):
                break
        self.admitted += 1
        if self.monitor:
            self.monitor.granted(token)
        return True

    def leave(self):  # type: ignore[no-untyped-def]
        self.admitted -= 1
        if self.monitor:
            self.monitor.left()
        self._queue.unpark()

    def grant(self, *, rule_changed=False):  # type: ignore[no-untyped-def]
        if rule_changed and self.monitor:
            self.monitor.rule_changed()
        self._queue.unpark_all()

    monkeypatch.setattr(Admission, "_room", lambda self: self._may_admit(self.admitted))
    monkeypatch.setattr(Admission, "enter", enter)
    monkeypatch.setattr(Admission, "leave", leave)
    monkeypatch.setattr(Admission, "grant", grant)


def plant_chunk_loop_without_a_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply loop as it was: no checkpoint, and no cap on chunks."""
    monkeypatch.setattr(dispatch, "CHECKPOINT_CHUNKS", 1 << 62)
    monkeypatch.setattr(replies, "MAX_REPLY_CHUNKS", 1 << 62)


def plant_cookies_that_reuse_the_slot_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cookies as they were: the slot's index, reused by the next request."""
    original = dispatch.Dispatcher.open_slot

    def open_slot(self, session, cursor, buffer):  # type: ignore[no-untyped-def]
        slot = original(self, session, cursor, buffer)
        slot.cookie &= dispatch.MAX_SLOTS  # no generation
        return slot

    monkeypatch.setattr(dispatch.Dispatcher, "open_slot", open_slot)


def plant_unbounded_list_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export and context lists as they were: kept, however long."""
    monkeypatch.setattr(negotiate, "MAX_LIST_ENTRIES", 1 << 62)
    monkeypatch.setattr(negotiate, "MAX_LIST_BYTES", 1 << 62)


def plant_late_reconnect_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconnect worker that waits 12 s before each attempt after the first (as if
    it backed off past ``retry_max``): it misses the server's return, and the
    reconnect delay expires."""
    original = connection.ClientConnection.__init__

    def __init__(self, attempt, *args, **kwargs):  # type: ignore[no-untyped-def]
        async def late_attempt():  # type: ignore[no-untyped-def]
            if self.attempts > 1:
                await trio.sleep(12)  # longer than the reconnect delay (8 s)
            return await attempt()

        original(self, late_attempt, *args, **kwargs)

    monkeypatch.setattr(connection.ClientConnection, "__init__", __init__)


CASES = {
    "fairness": (plant_newcomers_jump_the_queue,
                 dict(faults=(), ops=3000)),
    "liveness": (plant_chunk_loop_without_a_checkpoint,
                 dict(faults=("flood",), duration=12, fault_interval=0.3,
                      flood_bytes=16 * MiB)),
    "data": (plant_cookies_that_reuse_the_slot_index,
             dict(faults=("duplicate",), duration=15, fault_interval=0.05,
                  structured=False, max_in_flight=4)),
    # The fixed code grows by about 50 MiB under these floods, the planted bug by
    # hundreds: a 96 MiB allowance tells them apart.
    "memory": (plant_unbounded_list_collection,
               dict(faults=("flood",), duration=20, fault_interval=0.3,
                    flood_bytes=256 * MiB, rss_allowance=96 * MiB)),
    # Kills alone, a few seconds apart: the server is back long before the delay ends.
    "no unexplained failure": (plant_late_reconnect_attempts,
                               dict(faults=("kill",), duration=15, fault_interval=4,
                                    reconnect_delay=8, max_outage=1)),
}


# Each run is a fresh process with the bug planted: the memory invariant measures the
# resident set, which an earlier run in the same process (or an earlier test) leaves
# grown and fragmented, so later growth could reuse freed pages and go unseen.
CHILD = """
import json, os, sys
import pytest, trio
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]
from test_fuzz_planted import CASES
from blockdrv.fuzz.cli import main
from blockdrv.fuzz.config import FuzzConfig
from blockdrv.fuzz.runner import FuzzRun
invariant, reproducer, report = sys.argv[2:5]
plant, options = CASES[invariant]
plant(pytest.MonkeyPatch())
if sys.argv[5] == "run":
    result = trio.run(FuzzRun(FuzzConfig(seed=7, size=8 << 20, **options)).run)
    result.write_reproducer(reproducer)
    with open(report, "w") as out:
        json.dump(result.summary(), out)
    sys.exit(0 if result.ok else 1)
main(["--replay", reproducer, "--quiet", "--json", report,
      "--reproducer", reproducer + ".again"])
"""


def run_planted(invariant: str, mode: str, tmp_path: Path) -> list[dict]:
    """A fuzz run (``run``) or ``--replay`` of its reproducer, with the bug planted, in
    a child process; returns the violations it reported, having checked it failed."""
    report = tmp_path / f"{mode}.json"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent), invariant,
         str(tmp_path / "repro.json"), str(report), mode],
        capture_output=True, text=True, timeout=240)
    assert child.returncode == 1, (mode, child.returncode, child.stdout[-2000:],
                                   child.stderr[-2000:])
    violations: list[dict] = json.loads(report.read_text())["violations"]
    return violations


@pytest.mark.parametrize("invariant", list(CASES))
def test_the_fuzzer_catches_the_planted_bug(invariant, tmp_path: Path):
    caught = run_planted(invariant, "run", tmp_path)
    assert any(v["invariant"] == invariant for v in caught), caught[:3]
    assert json.loads((tmp_path / "repro.json").read_text())["config"]["seed"] == 7
    replayed = run_planted(invariant, "replay", tmp_path)
    assert any(v["invariant"] == invariant for v in replayed), replayed[:3]
