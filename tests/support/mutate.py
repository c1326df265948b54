"""Byte-stream mutations for fuzz tests (hypothesis strategy plus the applier)."""

from __future__ import annotations

from hypothesis import strategies as st

mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "big"]),
              st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1, max_size=4)


def mutate(data: bytes, changes: list[tuple[str, int, int]]) -> bytes:
    """Apply (kind, position, value) changes; "big" writes a huge 32-bit length."""
    out = bytearray(data)
    for kind, pos, value in changes:
        if not out:
            break
        pos %= len(out)
        if kind == "flip":
            out[pos] ^= value or 1
        elif kind == "insert":
            out.insert(pos, value)
        elif kind == "delete":
            del out[pos]
        elif kind == "truncate":
            del out[pos:]
        else:
            out[pos:pos + 4] = b"\xff\xff\xff\xf0"
    return bytes(out)
