"""A case-insensitive header dict shared by requests and responses."""
from __future__ import annotations

from typing import Any, Iterable


class HeaderMap(dict):
    """Header names are stored Title-Cased, so `h["content-type"]` finds "Content-Type"."""

    __slots__ = ()

    def __init__(self, items: Iterable[tuple[str, str]] | dict | None = None) -> None:
        # dict.__new__ made it empty; dict.__init__ would have nothing to do.
        if items:
            self.update(items)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.title())

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key.title(), value)

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key.title())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.title())

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.title(), default)

    def pop(self, key: str, *default: Any) -> Any:
        return dict.pop(self, key.title(), *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        return dict.setdefault(self, key.title(), default)

    def update(self, items: Any = (), **kw: Any) -> None:  # type: ignore[override]
        if hasattr(items, "items"):
            items = items.items()
        for k, v in items:
            self[k] = v
        for k, v in kw.items():
            self[k] = v

    def elements(self, key: str) -> list[str]:
        """The comma-separated values of a header, stripped, q-params removed, in order."""
        raw = self.get(key)
        if not raw:
            return []
        return [part.split(";", 1)[0].strip() for part in raw.split(",") if part.strip()]
