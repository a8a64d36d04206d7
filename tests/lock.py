"""Reading requirements.lock (written by .ci/lock) for tests: no pip, no network."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("MASKCLIP_LOCK", REPO / "requirements.lock"))
"""The lock under test; .ci/upgrade-check points this at its candidate lock."""

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]*?))?\s*\\?\s*$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Pin:
    name: str
    version: str
    marker: str | None
    hashes: list[str] = field(default_factory=list)


def read_lock(path: Path = LOCK) -> list[Pin]:
    """Every `name==version [; marker]` entry with the sha256 hashes that follow it."""
    pins: list[Pin] = []
    for line in path.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins.append(Pin(canonical(m.group(1)), m.group(2), m.group(3) or None))
        elif pins and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[-1].hashes.append(h.group(1))
    return pins


def lock_pins(path: Path = LOCK) -> dict[str, set[str]]:
    """name -> the versions the lock pins for it (more than one only where markers split it)."""
    out: dict[str, set[str]] = {}
    for pin in read_lock(path):
        out.setdefault(pin.name, set()).add(pin.version)
    return out
