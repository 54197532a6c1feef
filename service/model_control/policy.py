"""A model's version policy, read from ``<model>/config.json`` (Triton's ``version_policy`` in
the JSON form of its ModelConfig):

    {"version_policy": {"latest": {"num_versions": 2}}}
    {"version_policy": {"specific": {"versions": [1, 3]}}}
    {"version_policy": {"all": {}}}

No file, or no ``version_policy`` in it: every version (what cnnserve always served; Triton's own
default is the latest one). Any other key is refused, so that nobody believes a setting took
effect that cnnserve does not read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILENAME = "config.json"


class PolicyError(ValueError):
    """The model's config.json is unreadable or malformed; the message names the file."""


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "all"  # "all", "latest" or "specific"
    num_versions: int = 0  # latest
    versions: tuple[int, ...] = ()  # specific

    def choose(self, available: list[int]) -> list[int]:
        """The versions to serve among ``available`` (sorted ascending)."""
        if self.kind == "latest":
            return sorted(available)[-self.num_versions :]
        if self.kind == "specific":
            return sorted(v for v in available if v in self.versions)
        return sorted(available)

    def missing(self, available: list[int]) -> list[int]:
        """Specific versions the policy names that are not in the folder."""
        return [v for v in self.versions if v not in available] if self.kind == "specific" else []

    def as_config(self) -> dict[str, Any]:
        """Triton's ModelConfig ``version_policy`` (for the model configuration endpoint)."""
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return "versions " + ", ".join(map(str, self.versions))
        return "all versions"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_policy(doc: object, where: str) -> VersionPolicy:
    if not isinstance(doc, dict):
        raise PolicyError(f"{where}: must be a JSON object")
    unknown = sorted(set(doc) - {"version_policy"})
    if unknown:
        raise PolicyError(f"{where}: cnnserve reads only version_policy; remove {', '.join(unknown)}")
    policy = doc.get("version_policy", {"all": {}})
    if not isinstance(policy, dict) or len(policy) != 1:
        raise PolicyError(f"{where}: version_policy must hold exactly one of latest, specific, all")
    ((kind, body),) = policy.items()
    if not isinstance(body, dict):
        raise PolicyError(f"{where}: version_policy.{kind} must be an object")
    if kind == "all":
        return VersionPolicy()
    if kind == "latest":
        n = body.get("num_versions", 1)
        if not _positive_int(n):
            raise PolicyError(f"{where}: version_policy.latest.num_versions must be a positive integer, got {n!r}")
        return VersionPolicy("latest", num_versions=n)
    if kind == "specific":
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions or not all(_positive_int(v) for v in versions):
            raise PolicyError(f"{where}: version_policy.specific.versions must be a list of positive integers")
        return VersionPolicy("specific", versions=tuple(sorted(set(versions))))
    raise PolicyError(f"{where}: unknown version_policy {kind!r} (latest, specific or all)")


def read_policy(model_dir: Path) -> VersionPolicy:
    """The policy of the model in ``model_dir``; PolicyError naming the file when it is malformed."""
    path = model_dir / CONFIG_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return VersionPolicy()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read it: {e.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise PolicyError(f"{path}: not valid JSON ({e})") from None
    return parse_policy(doc, str(path))
