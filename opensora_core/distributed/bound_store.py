"""Run torchrun with its c10d TCPStore servers listening on one address only (127.0.0.1 by default).

torch's ``TCPStore`` server listens on every interface (``::``, dual stack) whatever host name it
is given, so ``torchrun --standalone`` opens its rendezvous store to the whole network. A
``TCPStore`` built with ``master_listen_fd`` adopts an already listening socket instead; this
module makes every server store torchrun creates in its agent process do that, with the socket
bound to ``--bind``::

    python -m opensora_core.distributed.bound_store --bind 127.0.0.1 torch.distributed.run \\
        --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 ... -m JOB

The workers are torchrun's children and connect to the store as clients; gloo binds to the
address ``MASTER_ADDR`` resolves to (``--local-addr 127.0.0.1``). Only the agent process is
changed, and only how the server socket is opened.
"""

from __future__ import annotations

import runpy
import socket
import sys
from typing import Any


def listen_socket(address: str, port: int) -> int:
    """A socket listening on ``address:port`` (port 0: a free one); returns its detached fd."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr)
    sock.listen(512)
    return sock.detach()


def apply_bound_store(address: str) -> type:
    """Replace ``torch.distributed.TCPStore`` (and the rendezvous backend's copy) by a subclass
    whose server listens on ``address`` only; returns the subclass."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore

    class BoundTCPStore(base):  # type: ignore[misc, valid-type]
        """A TCPStore whose server socket is bound to one address (see the module docstring)."""

        def __init__(
            self,
            host_name: str,
            port: int,
            world_size: int | None = None,
            is_master: bool = False,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            if is_master and kwargs.get("master_listen_fd") is None:
                kwargs["master_listen_fd"] = listen_socket(address, port)
            super().__init__(host_name, port, world_size, is_master, *args, **kwargs)

    dist.TCPStore = BoundTCPStore
    c10d_rendezvous_backend.TCPStore = BoundTCPStore
    return BoundTCPStore


def main(argv: list[str] | None = None) -> None:
    """``[--bind ADDRESS] MODULE ARGS...``: run ``python -m MODULE ARGS...`` with bound stores."""
    argv = list(sys.argv[1:] if argv is None else argv)
    address = "127.0.0.1"
    if argv[:1] == ["--bind"] and len(argv) >= 2:
        address, argv = argv[1], argv[2:]
    if not argv:
        sys.exit("usage: python -m opensora_core.distributed.bound_store [--bind ADDRESS] MODULE ARGS...")
    apply_bound_store(address)
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
