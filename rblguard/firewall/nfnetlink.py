"""Set elements straight to the kernel: one nfnetlink batch, encoded with bytes joins.

Why not libnftables for bulk bans: its text parser copies a 408-byte bison value per
token and resolves every address through getaddrinfo, ~2.5 us an element, about 80% of
a bulk ban's time; the kernel's own part is ~0.6 us.  An element of a single-address
set is a fixed 28 to 52 bytes (key, timeout, optionally expiration), so Python can
build a whole batch from constant headers and the packed addresses in a few C-level
joins, and send it in one ``sendmsg``: the same transaction libnftables would send
(``add element``: NEWSETELEM with NLM_F_CREATE, no NLM_F_EXCL, so an element already
there takes the new timeout and, with an expiration, restarts its clock).

Only single-address sets go this way; interval sets (prefixes) need the range ends and
overlap checks that libnftables computes, and stay on its text path.  The kernel
handles a batch inside ``sendmsg`` (netlink delivers to the kernel synchronously), so
the errors, if any, are queued on the socket when it returns: no waiting, no acks.
"""

from __future__ import annotations

import errno
import socket
import struct
from itertools import chain, repeat

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFT_MSG_NEWSETELEM = 12
NLM_F_REQUEST = 0x1
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NFPROTO_INET = 1
NLA_F_NESTED = 0x8000
# attribute numbers of include/uapi/linux/netfilter/nf_tables.h
LIST_TABLE, LIST_SET, LIST_ELEMENTS = 1, 2, 3
LIST_ELEM = 1
ELEM_KEY, ELEM_TIMEOUT, ELEM_EXPIRATION = 1, 4, 5
DATA_VALUE = 1
SO_SNDBUFFORCE = 32
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
PER_MESSAGE = 1000  # elements per message: its element list's length is 16 bits (64 KiB)

_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_NLA = struct.Struct("=HH")  # attribute: length, type
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big-endian)


def _attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    pad = -len(payload) % 4
    return _NLA.pack(4 + len(payload), kind) + payload + b"\0" * pad


class SetElementSocket:
    """A netfilter netlink socket that adds elements to sets of one inet table."""

    def __init__(self, table: str) -> None:
        self.table_attr = _attr(LIST_TABLE, table.encode() + b"\0")
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        # an error answer without a copy of the (up to 64 KiB) message it refuses
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.seq = 0
        self.sndbuf = 0
        self._set_attrs: dict[str, bytes] = {}

    def close(self) -> None:
        self.sock.close()

    def add(self, set_name: str, keys: list[bytes], seconds: list[int],
            refresh: bool) -> int:
        """Add (or refresh) ``keys`` (packed addresses, all of one length) with their
        timeouts in ONE transaction; 0, or the errno the kernel refused it with (then
        nothing of it was applied).  OSError if the socket itself fails."""
        if not keys:
            return 0
        messages = [self._message(set_name, keys[i:i + PER_MESSAGE],
                                  seconds[i:i + PER_MESSAGE], refresh)
                    for i in range(0, len(keys), PER_MESSAGE)]
        batch = b"".join([self._control(NFNL_MSG_BATCH_BEGIN), *messages,
                          self._control(NFNL_MSG_BATCH_END)])
        self._fit(len(batch))
        self._drain()  # nothing stale may be taken for this batch's answer
        self.sock.send(batch)
        return self._drain()

    def _message(self, set_name: str, keys: list[bytes], seconds: list[int],
                 refresh: bool) -> bytes:
        """One NEWSETELEM message: element = LIST_ELEM{TIMEOUT, [EXPIRATION], KEY{VALUE}}."""
        size = len(keys[0])
        key = _NLA.pack(8 + size, ELEM_KEY | NLA_F_NESTED) + _NLA.pack(4 + size, DATA_VALUE)
        millis = {s: (s * 1000).to_bytes(8, "big") for s in set(seconds)}
        stamps = list(map(millis.__getitem__, seconds))
        timeout = _NLA.pack(12, ELEM_TIMEOUT)
        if refresh:
            head = _NLA.pack(4 + 24 + 8 + size, LIST_ELEM | NLA_F_NESTED) + timeout
            parts = zip(repeat(head), stamps, repeat(_NLA.pack(12, ELEM_EXPIRATION)),
                        stamps, repeat(key), keys)
        else:
            head = _NLA.pack(4 + 12 + 8 + size, LIST_ELEM | NLA_F_NESTED) + timeout
            parts = zip(repeat(head), stamps, repeat(key), keys)
        elements = b"".join(chain.from_iterable(parts))
        set_attr = self._set_attrs.get(set_name)
        if set_attr is None:
            set_attr = self._set_attrs[set_name] = _attr(LIST_SET, set_name.encode() + b"\0")
        body = (_NFGEN.pack(NFPROTO_INET, 0, 0) + self.table_attr + set_attr
                + _NLA.pack(4 + len(elements), LIST_ELEMENTS | NLA_F_NESTED) + elements)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM
        return self._header(len(body), kind, NLM_F_REQUEST | NLM_F_CREATE) + body

    def _control(self, kind: int) -> bytes:
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
        return self._header(len(body), kind, NLM_F_REQUEST) + body

    def _header(self, body_length: int, kind: int, flags: int) -> bytes:
        self.seq += 1
        return _HDR.pack(_HDR.size + body_length, kind, flags, self.seq, 0)

    def _fit(self, length: int) -> None:
        """Grow the send buffer to hold the batch (netlink refuses a message larger than
        it); FORCE passes net.core.wmem_max, as nft itself does, for CAP_NET_ADMIN."""
        if length + 4096 <= self.sndbuf:
            return
        want = max(length + 65536, 2 * self.sndbuf)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        # the kernel doubles what it is given and refuses a message > that - 32
        self.sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32
        if self.sndbuf < length:
            raise OSError(errno.EMSGSIZE, f"netlink send buffer too small for {length}")

    def _drain(self) -> int:
        """Read every queued answer; the first error's errno, or 0."""
        first = 0
        while True:
            try:
                data = self.sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return first
            offset = 0
            while offset + _HDR.size <= len(data):
                length, kind = _HDR.unpack_from(data, offset)[:2]
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _HDR.size)[0]
                    first = first or code
                offset += max(length + (-length % 4), _HDR.size)
