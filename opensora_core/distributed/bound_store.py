"""Run torchrun with its c10d TCPStore servers listening on one address only (127.0.0.1 by default).

torch's ``TCPStore`` server listens on every interface (``::``, dual stack) whatever host name it
is given, so ``torchrun --standalone`` opens its rendezvous store to the whole network. A
``TCPStore`` built with ``master_listen_fd`` adopts an already listening socket instead; this
module makes every server store torchrun creates in its agent process do that, with the socket
bound to ``--bind``::

    python -m opensora_core.distributed.bound_store --bind 127.0.0.1 torch.distributed.run \\
        --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 ... -m JOB

The workers are torchrun's children and connect to the store as clients; gloo binds to the
address ``MASTER_ADDR`` resolves to (``--local-addr 127.0.0.1``).

It also gives the workers of every rendezvous round a store of their own
(:func:`apply_round_stores`, with or without ``--bind``). torch's c10d handler shares one worker
store, created in the first round, across all rounds, with no per-round prefix: after an elastic
restart the new workers find the dead ones' keys (gloo's peer addresses under ``default_pg/``)
and either connect to ports that are gone or wait in ``ProcessGroupGloo``'s full-mesh connect
until the process-group timeout (pytorch/pytorch#135712). Only the agent process is changed.
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


_ROUND_STORE_ADDR_KEY = "opensora/worker_store_addr"
_ROUND_STORE_PORT_KEY = "opensora/worker_store_port"


def apply_round_stores() -> None:
    """Make the c10d rendezvous hand each round's workers a fresh store (see the module docstring).

    The node that is rank 0 of the round starts a new TCPStore server in its agent (bound, when
    :func:`apply_bound_store` ran first) and publishes its address in the round's own key space
    of the rendezvous store, which every node of that round (and only of that round) reads. The
    agent outlives its workers, so the server does too; the previous round's server is closed.
    """
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousStoreInfo
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    if getattr(DynamicRendezvousHandler, "_opensora_round_stores", False):
        return
    join_round = DynamicRendezvousHandler.next_rendezvous

    def next_rendezvous(self: Any) -> RendezvousInfo:
        info = join_round(self)
        if not self.use_agent_store:  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0's worker hosts it
            return info
        store = info.store  # prefixed with this round's number: nothing from earlier rounds
        if info.rank == 0:
            addr = self._this_node.addr or socket.getfqdn()
            server = dist.TCPStore(addr, 0, is_master=True, multi_tenant=True)
            previous, self._opensora_round_server = getattr(self, "_opensora_round_server", None), server
            del previous
            store.set(_ROUND_STORE_ADDR_KEY, addr)
            store.set(_ROUND_STORE_PORT_KEY, str(server.port))
        addr = store.get(_ROUND_STORE_ADDR_KEY).decode()
        port = int(store.get(_ROUND_STORE_PORT_KEY).decode())
        return RendezvousInfo(store, info.rank, info.world_size, RendezvousStoreInfo(addr, port))

    DynamicRendezvousHandler.next_rendezvous = next_rendezvous
    DynamicRendezvousHandler._opensora_round_stores = True


def main(argv: list[str] | None = None) -> None:
    """``[--bind ADDRESS] MODULE ARGS...``: run ``python -m MODULE ARGS...`` with per-round worker
    stores, and with server stores bound to ``ADDRESS`` when given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    address = ""
    if argv[:1] == ["--bind"] and len(argv) >= 2:
        address, argv = argv[1], argv[2:]
    if not argv:
        sys.exit("usage: python -m opensora_core.distributed.bound_store [--bind ADDRESS] MODULE ARGS...")
    if address:
        apply_bound_store(address)
    apply_round_stores()
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
