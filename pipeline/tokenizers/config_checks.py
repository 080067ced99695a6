"""What model config dataclasses share: field checks whose error names the offending field."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config field that cannot work; `field` names it (a spec error is reported at that key)."""

    def __init__(self, owner: str, field: str, message: str):
        super().__init__(f"{owner}.{field} {message}")
        self.field, self.message = field, message


def require(owner: str, checks: list[tuple[str, bool, str]]) -> None:
    """Raise a ConfigError for the first (field, ok, message) that is not ok."""
    for field, ok, message in checks:
        if not ok:
            raise ConfigError(owner, field, message)
