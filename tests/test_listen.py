"""In the single-container layout only the UI port is meant to be reachable: every listening socket of the
appliance's process tree, found through /proc (socket inodes of each process's fds matched against
/proc/net/tcp, tcp6, udp and udp6), binds loopback, except APPLIANCE_PORT, and nothing binds a wildcard address.
The session appliance sets APPLIANCE_HOST=127.0.0.1, so here even the UI listens on loopback."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"
UDP_UNCONNECTED = "07"


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    return inodes


def address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def bound_sockets(inodes: dict[str, int]) -> list[dict]:
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes:
                continue
            if (table.startswith("tcp") and state != LISTEN) or (table.startswith("udp") and
                                                                 state != UDP_UNCONNECTED):
                continue
            hex_ip, hex_port = local.split(":")
            found.append({"table": table, "ip": address(hex_ip), "port": int(hex_port, 16), "pid": inodes[inode],
                          "cmd": Path(f"/proc/{inodes[inode]}/cmdline").read_bytes().replace(b"\0", b" ")[:120]})
    return found


def test_only_loopback_listens_besides_the_ui_port(appliance):
    tree = descendants(appliance.proc.pid)
    sockets = bound_sockets(socket_inodes(tree))
    tcp = [s for s in sockets if s["table"].startswith("tcp")]
    ports = {s["port"] for s in tcp}
    ui, sam, predict = (int(appliance.env[k]) for k in ("APPLIANCE_PORT", "APPLIANCE_SAM_PORT",
                                                         "APPLIANCE_PREDICT_PORT"))
    assert {ui, sam, predict} <= ports, sockets  # the walk did find the appliance's sockets
    wildcard = [s for s in sockets if s["ip"].is_unspecified]
    assert not wildcard, f"bound to a wildcard address: {wildcard}"
    for s in sockets:
        if s["port"] != ui:
            assert s["ip"].is_loopback, f"listens off loopback: {s}"
    # the backends have a loopback address of their own: the one address Label Studio's SSRF guard lets through
    for port in (sam, predict):
        assert {str(s["ip"]) for s in tcp if s["port"] == port} == {"127.0.0.2"}


def test_address_parsing():
    assert str(address("0100007F")) == "127.0.0.1"
    assert address("00000000").is_unspecified
    assert str(address("00000000000000000000000001000000")) == "::1"
