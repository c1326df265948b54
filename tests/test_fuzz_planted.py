"""The fuzzer's new invariants catch the bugs they are for: each test plants one (the
defect as it once shipped), runs a short fuzz run, expects the right violation, writes
the reproducer, and replays it (``blockdrv-fuzz --replay``) to the same violation.

The runs are in-process (``FuzzRun``, and the command through click's runner) so the
planted bug, a monkeypatch, applies to both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from blockdrv.fuzz.cli import main
from blockdrv.fuzz.config import FuzzConfig
from blockdrv.fuzz.runner import FuzzRun
from blockdrv.nbd import admission, dispatch
from blockdrv.protocol import negotiate, replies
from blockdrv.units import MiB

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
}


@pytest.mark.parametrize("invariant", list(CASES))
def test_the_fuzzer_catches_the_planted_bug(invariant, monkeypatch, tmp_path: Path):
    plant, options = CASES[invariant]
    plant(monkeypatch)
    config = FuzzConfig(seed=7, size=8 * MiB, **options)  # type: ignore[arg-type]

    async def run():  # type: ignore[no-untyped-def]
        with trio.fail_after(240):
            return await FuzzRun(config).run()

    result = trio.run(run)
    caught = [v for v in result.violations if v.invariant == invariant]
    assert caught, (invariant, result.violations[:3], result.summary())
    reproducer = tmp_path / "repro.json"
    result.write_reproducer(reproducer)
    assert json.loads(reproducer.read_text())["config"]["seed"] == 7

    report = tmp_path / "again.json"
    again = CliRunner().invoke(main, ["--replay", str(reproducer), "--quiet", "--json",
                                      str(report), "--reproducer",
                                      str(tmp_path / "again-repro.json")])
    assert again.exit_code == 1, again.output
    replayed = json.loads(report.read_text())["violations"]
    assert any(v["invariant"] == invariant for v in replayed), replayed[:3]
