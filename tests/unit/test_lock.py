"""requirements-lock.txt is a full lock: every requirement of pyproject.toml (and its test extras),
transitively, pinned to one version - refreshed by scripts/lock.sh, installed by scripts/setup.sh."""

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and ";" not in line, f"not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_pins_every_requirement_transitively():
    pins = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    seen = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        # torch itself is installed first by scripts/setup.sh (CPU build) or is the cluster's CUDA one;
        # its dependencies are locked like any other
        assert name in pins or name == "torch", f"{req.name} is required but not in requirements-lock.txt: run scripts/lock.sh"
        assert name == "torch" or pins[name] in req.specifier or not req.specifier, f"lock pins {name}=={pins[name]} outside {req}"
        try:  # follow the installed distribution's own requirements (its extras included)
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for extra in [""] + sorted(req.extras):
            for r in dist.requires or []:
                sub = Requirement(r)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    assert "torch" not in pins and not [n for n in pins if n.startswith("nvidia-")]
