"""requirements.lock against pyproject.toml, .ci/lock-pins.txt and the Makefile: the lock is in
step with the ranges, pins the torch pair the machines hold, carries hashes, and is what `make`
installs. File against file; what pip installed here plays no part."""

from __future__ import annotations

import re

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.lock import LOCK, REPO, canonical, read_lock

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonical(PYPROJECT["project"]["name"])
ENVIRONMENTS = {  # the dev machines and CI (3.11), the image (Ubuntu 24.04: 3.12), the floor
    f"linux-x86_64-py{v}": {
        "python_version": v,
        "python_full_version": f"{v}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for v in ("3.10", "3.11", "3.12")
}


def _requirements() -> list[tuple[str, Requirement]]:
    out = [("dependencies", Requirement(r)) for r in PYPROJECT["project"]["dependencies"]]
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        out += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return out


def _pins_for(env: dict[str, str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for pin in read_lock():
        if pin.marker is None or Marker(pin.marker).evaluate(env):
            assert pin.name not in pins, f"{LOCK.name}: two pins of {pin.name} apply in {env}"
            pins[pin.name] = pin.version
    return pins


@pytest.mark.parametrize("env_name", list(ENVIRONMENTS))
def test_lock_satisfies_every_pyproject_range(env_name):
    """A range changed in pyproject.toml without re-locking (.ci/lock) fails here, naming it."""
    env = ENVIRONMENTS[env_name]
    pins = _pins_for(env)
    problems = []
    for where, req in _requirements():
        name = canonical(req.name)
        if name == PROJECT or (req.marker and not req.marker.evaluate({**env, "extra": ""})):
            continue
        if name not in pins:
            problems.append(f"{where} {req}: not in {LOCK.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{where} {req}: {LOCK.name} pins {pins[name]}")
    assert not problems, "re-run .ci/lock:\n" + "\n".join(problems)


def test_lock_pins_the_torch_pair_on_disk_and_hashes_everything():
    """torch/torchvision are the pair in .ci/lock-pins.txt (the one pip takes from local disk on
    the dev machines: any other costs CI a multi-GB download), and every pin carries a hash, so
    `pip install --require-hashes` (Makefile, Dockerfile) accepts the file."""
    wanted = dict(
        line.split("==")
        for line in (REPO / ".ci/lock-pins.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    pins = _pins_for(ENVIRONMENTS["linux-x86_64-py3.11"])
    assert {k: pins[k] for k in wanted} == wanted
    assert wanted == {"torch": "2.14.1", "torchvision": "0.29.1"}
    unhashed = [p.name for p in read_lock() if not p.hashes]
    assert not unhashed, f"{LOCK.name}: no --hash for {unhashed}"


def test_make_installs_from_the_lock_and_restamps_on_either_file():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK \?= requirements\.lock$", text, re.M)
    assert re.search(r"^STAMP := .*cat pyproject\.toml \$\(LOCK\) \| cksum", text, re.M)
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(LOCK\)$", text, re.M)
    installs = re.findall(r"^\t\$\(BIN\)/pip install (.*)$", text, re.M)
    assert installs == [
        "-q --upgrade pip",
        "-q --require-hashes -r $(LOCK)",
        "-q --no-deps -e .",
    ]
    assert "make test" in (REPO / ".ci/run").read_text()
