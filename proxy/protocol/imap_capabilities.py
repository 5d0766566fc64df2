"""The IMAP capability list announced before login; no I/O.

The proxy's own capabilities (AUTH=PLAIN, SASL-IR, ID, STARTTLS or LOGINDISABLED as the
listener needs) come first, then what the upstream offers *after* login (learned by the
driver from earlier logins): clients that read the list once, before login, then see IDLE,
MOVE, UIDPLUS… The upstream's AUTH=, STARTTLS and LOGINDISABLED are about its own login and
are dropped. LITERAL+ is announced while the upstream's list is unknown or has it (LITERAL- if
that is what it has): after login the client's literals go to the upstream, which must accept
them.
"""

from __future__ import annotations

import functools
import re

# Before login these are the proxy's to announce, not the upstream's (AUTH=… as well).
_PROXY_DECIDES = frozenset({"IMAP4REV1", "STARTTLS", "LOGINDISABLED", "SASL-IR", "ID",
                            "LITERAL+", "LITERAL-"})
_CAPABILITY_ATOM = re.compile(r'[!#$&\'+-Z^-z|}~]+')  # ATOM-CHAR, less "["
_UPSTREAM_CAPS_MAX = 2000  # characters of the upstream's list taken into ours


@functools.lru_cache(maxsize=64)
def announced(upstream: str | None, starttls: bool, plaintext_refused: bool) -> str:
    """The pre-login list: the proxy's own capabilities, then the upstream's post-login ones.

    Memoised: sessions pass the same upstream string until it changes, so a greeting costs a
    dictionary look-up, not a merge.
    """
    caps = ["IMAP4rev1"]
    if starttls:
        caps.append("STARTTLS")
    # RFC 3501 §6.2.3 / RFC 2595 §6: with LOGINDISABLED no plaintext mechanism is offered.
    caps += ["LOGINDISABLED" if plaintext_refused else "AUTH=PLAIN", "SASL-IR"]
    if upstream is None:
        return " ".join([*caps, "LITERAL+", "ID"])
    offered = upstream.split()
    names = {cap.upper() for cap in offered}
    # The parser here takes any non-synchronising literal, but after login the client's
    # literals go to the upstream: promise only what it keeps (RFC 7888).
    literal = "LITERAL+" if "LITERAL+" in names else "LITERAL-" if "LITERAL-" in names else None
    caps += [literal, "ID"] if literal else ["ID"]
    seen = {cap.upper() for cap in caps}
    room = _UPSTREAM_CAPS_MAX
    for cap in offered:
        name = cap.upper()
        if (name in seen or name in _PROXY_DECIDES or name.startswith("AUTH=")
                or not _CAPABILITY_ATOM.fullmatch(cap) or len(cap) >= room):
            continue
        seen.add(name)
        caps.append(cap)
        room -= len(cap) + 1
    return " ".join(caps)
