"""``python -m bench.upstream_run ...``: the embedded fake Microsoft 365, unchanged, except
that its listeners get a listen backlog of 4096 instead of Twisted's default of 50.

With 50, a burst of 1,000 connects overflows the accept queue and the kernel drops SYNs, so
the slowest connects wait for a 1 s (then 3 s) SYN retransmission: a property of the fake,
not of any contestant (Microsoft 365's front ends do not drop a burst of 1,000). The proxy
itself listens with a backlog of 4096 too.
"""

import sys

from twisted.internet import reactor

BACKLOG = 4096
_listen_tcp, _listen_ssl = reactor.listenTCP, reactor.listenSSL


def listen_tcp(port, factory, backlog=BACKLOG, interface=""):
    return _listen_tcp(port, factory, backlog=max(backlog, BACKLOG), interface=interface)


def listen_ssl(port, factory, context_factory, backlog=BACKLOG, interface=""):
    return _listen_ssl(port, factory, context_factory, backlog=max(backlog, BACKLOG),
                       interface=interface)


reactor.listenTCP = listen_tcp
reactor.listenSSL = listen_ssl

from proxy.demo.upstream import main  # noqa: E402

sys.exit(main())
