"""The TCP listeners on this machine and the processes that own them, read from ``/proc`` (Linux)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    pid: int | None
    command: str

    @property
    def loopback_only(self) -> bool:
        address = self.address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback

    def __str__(self) -> str:
        return f"{self.address}:{self.port} ({self.pid} {self.command[:80]})"


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host order (little-endian here).
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _owners() -> dict[int, int]:
    """Socket inode -> pid, for every process whose descriptors this user may read."""
    owners: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = int(entry.name)
        except OSError:
            continue
    return owners


def _command(pid: int | None) -> str:
    if pid is None:
        return "?"
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def listeners() -> set[Listener]:
    owners = _owners()
    found: set[Listener] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            host, port = fields[1].split(":")
            pid = owners.get(int(fields[9]))
            found.add(Listener(_address(host), int(port, 16), pid, _command(pid)))
    return found
