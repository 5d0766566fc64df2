"""The embedded fake Microsoft 365: a fake Entra ID and IMAP/POP3/SMTP servers on Twisted.

It runs in a process of its own (``python -m proxy.demo.upstream``): Twisted's reactor is
a process-wide singleton, and keeping it out of the proxy's process means the proxy never
imports Twisted, the upstream gets its own core in benchmarks, and tests can kill it to
simulate an outage. ``proxy.demo.process`` starts and drives it from the outside.
"""
