"""Reading a decoded TOML document: ``Table`` remembers where it is (its key path, the file)
and which keys were read, so every mistake becomes a one-line ``ConfigError`` naming the file
and the key, and a key nobody read is refused as a typo.

A config section is a function that takes the ``Table`` it reads from and returns a frozen
dataclass (``proxy.config.limits.read_limits`` is the smallest example); it may live in any
package, and ``proxy.config.loader.parse`` calls it.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.config.model import Address, ConfigError, Network


class Table:
    """A TOML table being read: remembers its key path and which keys were used."""

    def __init__(self, data: dict[str, Any], path: str, file: Path) -> None:
        self.data, self.path, self.file = data, path, file
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str | None, message: str) -> ConfigError:
        where = self.key(name) if name else (self.path or "(top level)")
        return ConfigError(f"{self.file}: {where}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *,
            required_hint: str = "") -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is ...:
                typo = difflib.get_close_matches(name, [k for k in self.data if k not in self.used], 1)
                hint = f" (found '{typo[0]}': a typo?)" if typo else (
                    f" ({required_hint})" if required_hint else "")
                raise self.fail(name, "is required" + hint)
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise self.fail(name, f"must be {_kind_name(kinds)} (got {value!r})")
        return value

    def text(self, name: str, default: Any = ..., **kw: Any) -> Any:
        value = self.get(name, str, default, **kw)
        if isinstance(value, str) and not value.strip():
            raise self.fail(name, "must not be empty")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(name, str, default)
        if value not in choices and value is not default:
            raise self.fail(name, f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = float(self.get(name, (int, float), default))
        if not low <= value <= high:
            raise self.fail(name, f"must be between {low:g} and {high:g} (got {value:g})")
        return value

    def port(self, name: str, default: Any = ...) -> int:
        value = self.get(name, int, default)
        if not 1 <= value <= 65535:
            raise self.fail(name, f"must be a port number from 1 to 65535 (got {value})")
        return int(value)

    def file_path(self, name: str, *, must_exist: bool = False) -> Path | None:
        """A path, relative to the config file's folder unless absolute; None when unset."""
        value = self.text(name, None)
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            path = (self.file.parent / path).resolve()
        if must_exist and not path.exists():
            raise self.fail(name, f"file {path} does not exist")
        return path

    def networks(self, name: str) -> tuple[Network, ...]:
        """A non-empty list of addresses or CIDR networks, none of them matching everything."""
        networks, values = [], self.get(name, list)
        if not values:
            raise self.fail(name, "must list the devices' addresses or networks")
        for value in values:
            try:
                network = ipaddress.ip_network(value.strip(), strict=True)
            except (AttributeError, ValueError) as exc:
                loose = (ipaddress.ip_network(value.strip(), strict=False)
                         if isinstance(exc, ValueError) and "host bits" in str(exc) else None)
                raise self.fail(name, f"{value!r} is not an address or CIDR network" + (
                    f"; did you mean {loose}?" if loose else ", e.g. \"192.0.2.0/24\"")) from None
            if network.prefixlen == 0:
                what = " (an open relay)" if name == "sources" else ""
                raise self.fail(name, f"{value!r} matches every address{what}; list the devices' "
                                      "addresses or networks")
            networks.append(network)
        return tuple(networks)

    def table(self, name: str, *, required: bool = False) -> Table | None:
        self.used.add(name)
        if name not in self.data:
            if required:
                raise self.fail(name, "is required")
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return Table(value, self.key(name), self.file)

    def subtables(self, name: str) -> Iterator[tuple[str, Table]]:
        """``[NAME.KEY]`` tables, one ``(KEY, Table)`` each, in file order."""
        outer = self.table(name)
        if outer is None:
            return
        for key, value in outer.data.items():
            outer.used.add(key)
            if not isinstance(value, dict):
                raise outer.fail(key, "must be a table")
            yield key, Table(value, f"{outer.key(_quote(key))}", self.file)

    def array(self, name: str) -> list[Table]:
        """An array of tables, ``[[NAME]]``, in file order (empty when there is none)."""
        self.used.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise self.fail(name, f"must be an array of tables: [[{name}]]")
        return [Table(item, f"{self.key(name)}[{i}]", self.file) for i, item in enumerate(items)]

    def done(self) -> None:
        """Reject keys that were never read: a typo must not be ignored silently."""
        for name in self.data:
            if name not in self.used:
                close = difflib.get_close_matches(name, sorted(self.used), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise self.fail(name, f"unknown key{hint}")


def _quote(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else f'"{key}"'


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_address(text: str, table: Table, name: str) -> Address:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise table.fail(name, f"must be HOST:PORT, e.g. 127.0.0.1:1143 (got {text!r})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise table.fail(name, f"port must be 0 to 65535 (got {port_text!r})")
    return Address(host, int(port_text))


__all__ = ["Table", "parse_address"]
