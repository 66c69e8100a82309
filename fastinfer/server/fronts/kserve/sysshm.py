"""Client shared memory: Triton's system shared-memory extension, the registry both v2 fronts share.

A local client puts a tensor in a POSIX shared-memory object of its own (``shm_open``, so a file
under /dev/shm), registers a window of it as a named region, and names the region, an offset and a
size instead of sending bytes; outputs are written straight into such a region. Since the server
then reads and writes memory a client chose, the rules are strict:

- Off unless ``allow_client_shm``; only clients on this machine (loopback or Unix socket), which
  have passed the port's token check like any request.
- A key is a POSIX shared-memory name (``/name``, no other slash), opened under /dev/shm without
  following links; it must be a regular file there. Names like fastinfer's own memory are refused,
  and so is any object that is the slot pool (fastinfer's is a memfd, which has no name to open).
- The region is never mapped. Tensors move with ``preadv``/``pwritev`` on the descriptor, straight
  between the client's pages and the slot: one copy, as through a mapping, but a client that
  truncates or unlinks its object cannot crash the server (a mapping would raise SIGBUS past the
  file's end; a read there is short, which is an error of that request). Each use checks the
  offset and size against the registered window, and the object's current size with ``fstat``.
- A region in use by a request stays open until the request is done, even if it is unregistered
  meanwhile: its descriptor number could otherwise be reused by another file under the request's
  feet. Unregistering, and the server's stop, close the descriptors.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from fastinfer.errors import AlreadyExists, BadRequest, Forbidden
from fastinfer.shm import MEMFD_NAME

SHM_DIR = "/dev/shm"
MAX_REGIONS = 256  # per server: each holds a descriptor open
EXTENSION = "system_shared_memory"
_KEY = re.compile(r"/?([A-Za-z0-9_.\-]{1,200})")
OWN_PREFIX = MEMFD_NAME.split("-")[0]  # "fastinfer"


class UnknownRegion(BadRequest):
    """The request names a region that is not registered."""

    code = "unknown_shm_region"


class RegionOutOfBounds(BadRequest):
    """An offset or size reaches outside the registered region, or past the object's current end."""

    code = "shm_out_of_bounds"


def is_local(peer: str | None) -> bool:
    """Whether a peer address is this machine: a loopback IP, or a Unix socket (None or "")."""
    if not peer:
        return True
    try:
        return ipaddress.ip_address(peer.split("%")[0]).is_loopback or _mapped_loopback(peer)
    except ValueError:
        return False


def _mapped_loopback(peer: str) -> bool:
    address = ipaddress.ip_address(peer)
    return isinstance(address, ipaddress.IPv6Address) and bool(address.ipv4_mapped and address.ipv4_mapped.is_loopback)


@dataclass
class Region:
    """A registered window ``[offset, offset + byte_size)`` of a client's shared-memory object."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    users: int = 0
    unregistered: bool = False

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def locate(self, offset: int, nbytes: int, what: str) -> int:
        """The object offset of ``nbytes`` at ``offset`` in the window, checked now against the
        window and against the object's current size (a client may have shrunk it)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.byte_size:
            raise RegionOutOfBounds(
                f"{what}: {nbytes} bytes at offset {offset} do not fit region {self.name!r} ({self.byte_size} bytes)"
            )
        start = self.offset + offset
        size = os.fstat(self.fd).st_size
        if start + nbytes > size:
            raise RegionOutOfBounds(
                f"{what}: region {self.name!r} ends at byte {size} of its object now, before the "
                f"{nbytes} bytes at {start}; it was shrunk after it was registered"
            )
        return start

    def read_into(self, views: list[memoryview], start: int, what: str) -> None:
        """Fill ``views`` from the object at ``start`` (blocking: a thread for large ones)."""
        wanted = sum(len(v) for v in views)
        got = os.preadv(self.fd, views, start)
        if got != wanted:  # truncated between the check and the read
            raise RegionOutOfBounds(f"{what}: region {self.name!r} was shrunk while it was read")

    def write_from(self, views: list[memoryview], start: int) -> None:
        """Write ``views`` to the object at ``start``. A write past the end would grow the object
        (its owner shrank it meanwhile): harmless to us, within the window it registered."""
        os.pwritev(self.fd, views, start)


class ClientRegions:
    """The registered regions of one server. ``own_fds`` gives the descriptors of fastinfer's own
    shared memory, which no registration may name."""

    def __init__(self, own_fds: Callable[[], list[int]] = list, shm_dir: str = SHM_DIR):
        self.own_fds = own_fds
        self.shm_dir = shm_dir
        self._regions: dict[str, Region] = {}

    def status(self, name: str = "") -> list[dict[str, object]]:
        if name:
            return [self.get(name).status()]
        return [region.status() for region in self._regions.values()]

    def get(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise UnknownRegion(f"no shared-memory region named {name!r} is registered") from None

    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        """Open and check the object, and remember the window (the arguments are client JSON)."""
        if not isinstance(name, str) or not name:
            raise BadRequest("a region needs a name (a non-empty string)")
        if name in self._regions:
            raise AlreadyExists(f"a shared-memory region named {name!r} is registered already")
        if len(self._regions) >= MAX_REGIONS:
            raise BadRequest(f"{MAX_REGIONS} regions are registered, the most allowed; unregister one")
        if not isinstance(key, str) or not (match := _KEY.fullmatch(key)) or match.group(1) in (".", ".."):
            raise BadRequest(f'"key" must be a POSIX shared-memory name such as "/my_region", not {key!r}')
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if type(value) is not int or value < 0:
                raise BadRequest(f'"{what}" must be a non-negative integer')
        assert isinstance(offset, int) and isinstance(byte_size, int)
        if byte_size == 0:
            raise BadRequest('"byte_size" must be positive')
        basename = match.group(1)
        if basename.lower().startswith(OWN_PREFIX):
            raise Forbidden(f"{key!r} names fastinfer's own memory, which clients may not register")
        fd = self._open(key, basename)
        try:
            info = os.fstat(fd)
            for own in self.own_fds():
                mine = os.fstat(own)
                if (mine.st_dev, mine.st_ino) == (info.st_dev, info.st_ino):
                    raise Forbidden(f"{key!r} is fastinfer's own memory, which clients may not register")
            if offset + byte_size > info.st_size:
                raise RegionOutOfBounds(
                    f"{byte_size} bytes at offset {offset} run past the end of {key!r} ({info.st_size} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, fd)

    def _open(self, key: str, basename: str) -> int:
        path = os.path.join(self.shm_dir, basename)
        try:
            # No link followed, no controlling tty, nothing that blocks (a FIFO is refused below).
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BadRequest(f"no shared-memory object {key!r}; create it with shm_open first") from None
        except OSError as error:
            raise Forbidden(f"cannot open shared-memory object {key!r}: {os.strerror(error.errno or 0)}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_dev != os.stat(self.shm_dir).st_dev:
            os.close(fd)
            raise Forbidden(f"{key!r} is not a POSIX shared-memory object")
        return fd

    def unregister(self, name: str = "") -> None:
        """Forget ``name`` (every region if ""); an unknown name is no error, as in Triton."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.unregistered = True
                if not region.users:
                    os.close(region.fd)

    def acquire(self, name: str) -> Region:
        """The region, held open until :meth:`release` (a request in flight uses it)."""
        region = self.get(name)
        region.users += 1
        return region

    def release(self, region: Region) -> None:
        region.users -= 1
        if region.unregistered and not region.users:
            os.close(region.fd)

    def close(self) -> None:
        """Unregister every region (at the server's stop)."""
        self.unregister()
