"""What ``blockdrv info``, ``list`` and ``map`` print, laid out as nbdinfo lays it out.

The fields, their names and their order are nbdinfo's (libnbd's ``info/show.c``):
``export-name``, ``description``, ``uri``, ``contexts``, ``is_*``, ``can_*``,
``block_size_*``, ``export-size``, ``export-size-str``; a field the server did not
send is left out, as nbdinfo leaves it out.  ``--can``/``--is`` take nbdinfo's feature
names (:data:`FEATURES`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from ..copy.extents import Total
from ..protocol.export import ExportInfo

_UNITS = ("", "K", "M", "G", "T", "P", "E")


def human_size(size: int) -> str:
    """nbdinfo's size string: the largest unit that divides the size exactly (1G,
    2075312K, 1000)."""
    unit = 0
    while size and size % 1024 == 0 and unit < len(_UNITS) - 1:
        size //= 1024
        unit += 1
    return f"{size}{_UNITS[unit]}"


_FLAGS = ("is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero",
          "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero")
_BLOCK_SIZES = ("block_size_minimum", "block_size_preferred", "block_size_maximum")


def export_fields(info: ExportInfo, *, uri: str, contexts: Iterable[str],
                  description: str | None = None) -> dict[str, Any]:
    """One export as nbdinfo's JSON has it, in nbdinfo's order."""
    fields: dict[str, Any] = {"export-name": info.name}
    description = description or info.description
    if description:
        fields["description"] = description
    fields["uri"] = uri
    fields["contexts"] = sorted(contexts)
    for name in _FLAGS:
        fields[name] = getattr(info, name)
    for name in _BLOCK_SIZES:
        value = getattr(info, name)
        if value:
            fields[name] = value
    fields["export-size"] = info.size
    fields["export-size-str"] = human_size(info.size)
    return fields


def protocol_fields(info: ExportInfo) -> dict[str, Any]:
    """The document's first fields: protocol, TLS and reply style."""
    return {"protocol": info.protocol, "TLS": info.tls, "structured": info.structured,
            "extended": info.extended}


def protocol_line(info: ExportInfo) -> str:
    """``protocol: newstyle-fixed without TLS, using structured packets``."""
    words = [f"{'with' if info.tls else 'without'} TLS"]
    if info.extended:
        words.append("using extended packets")
    elif info.structured:
        words.append("using structured packets")
    return f"protocol: {info.protocol} {', '.join(words)}"


def export_lines(fields: dict[str, Any]) -> list[str]:
    """One export as nbdinfo's text output has it (``export="NAME":`` and tabbed
    fields); fields nbdinfo does not have follow its own, in the same form."""
    lines = [f"export={json.dumps(fields['export-name'])}:"]
    rest = {key: value for key, value in fields.items()
            if key not in ("export-name", "export-size", "export-size-str")}
    description = rest.pop("description", None)
    if description:
        lines.append(f"\tdescription: {description}")
    size, size_str = fields["export-size"], fields["export-size-str"]
    lines.append(f"\texport-size: {size} ({size_str})" if size_str != str(size)
                 else f"\texport-size: {size}")
    for key, value in rest.items():
        if key == "contexts":
            lines.append("\tcontexts:")
            lines.extend(f"\t\t{name}" for name in value)
        elif isinstance(value, bool):
            lines.append(f"\t{key}: {str(value).lower()}")
        else:
            lines.append(f"\t{key}: {value}")
    return lines


_FEATURE_TESTS: list[tuple[tuple[str, ...], Callable[[ExportInfo], bool]]] = [
    (("connect", "read"), lambda info: True),
    (("tls",), lambda info: info.tls),
    (("sr", "structured", "structured-reply", "structured-replies"),
     lambda info: info.structured),
    (("readonly", "read-only"), lambda info: info.is_read_only),
    (("write",), lambda info: not info.is_read_only),
    (("rotational",), lambda info: info.is_rotational),
    (("cache",), lambda info: info.can_cache),
    (("df",), lambda info: info.can_df),
    (("fastzero", "fast-zero"), lambda info: info.can_fast_zero),
    (("flush",), lambda info: info.can_flush),
    (("fua",), lambda info: info.can_fua),
    (("multiconn", "multi-conn"), lambda info: info.can_multi_conn),
    (("trim",), lambda info: info.can_trim),
    (("zero",), lambda info: info.can_zero),
]
FEATURES = {name: test for names, test in _FEATURE_TESTS for name in names}
"""``--can``/``--is`` feature names, as nbdinfo spells them (case, ``-``, ``_`` and
spaces do not matter), and how each is answered."""


def feature_test(name: str) -> Callable[[ExportInfo], bool]:
    """The test for ``--can NAME``/``--is NAME``; ValueError for a name nbdinfo does
    not know."""
    test = FEATURES.get(name.lower().replace("_", "-").replace(" ", "-"))
    if test is None:
        raise ValueError(f"unknown --can or --is option: {name}")
    return test


def total_line(total: Total, description: str | None) -> str:
    """``nbdinfo --map --totals`` text: size, percentage, type, description."""
    line = f"{total.size:10d} {total.percent:5.1f}% {total.type:3d}"
    return f"{line} {description}" if description is not None else line


def total_json(total: Total, description: str | None) -> dict[str, Any]:
    """``nbdinfo --map --totals --json``: the percentage as C's %g prints it."""
    percent = float(f"{total.percent:g}")
    entry: dict[str, Any] = {"size": total.size,
                             "percent": int(percent) if percent.is_integer() else percent,
                             "type": total.type}
    if description is not None:
        entry["description"] = description
    return entry


def extent_line(offset: int, length: int, flags: int, description: str | None) -> str:
    """``nbdinfo --map`` text: offset, length, type, description."""
    line = f"{offset:10d}  {length:10d}  {flags:3d}"
    return f"{line}  {description}" if description is not None else line
