"""Who is asking, for the rate limit: the peer's address, or, behind proxies we
trust (TASKMAN_TRUSTED_PROXIES), the address they say the request came from; an
IPv6 client counted by its /64, as one host usually holds a whole /64."""

import ipaddress

from starlette.types import Scope

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientKeys:
    """The key a request's counts are kept under."""

    def __init__(self, trusted_proxies: list[str], memo_size: int) -> None:
        self.trusted: list[IPNetwork] = [
            ipaddress.ip_network(p, strict=False) for p in trusted_proxies
        ]
        self._memo_size = memo_size
        self._peers: dict[str, str] = {}  # peer -> key, without trusted proxies

    def of(self, scope: Scope) -> str:
        """Who is asking: the peer, or what our trusted proxies say the peer was."""
        peer = (scope.get("client") or ("",))[0]
        if not self.trusted:
            # The peer alone decides: parsed once per peer (a bounded memo).
            key = self._peers.get(peer)
            if key is None:
                if len(self._peers) >= self._memo_size:
                    self._peers.clear()
                key = self._peers[peer] = _key(_parse_ip(peer), peer)
            return key
        address = _parse_ip(peer)
        if address is None or not self._is_trusted(address):
            return _key(address, peer)
        # Each proxy appends the address it got the request from, so the right-most
        # entry that is not one of ours is the client. Whatever is left of it came
        # from the client itself and may be made up.
        forwarded = [
            entry.strip()
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
            for entry in value.decode("latin-1").split(",")
            if entry.strip()
        ]
        for entry in reversed(forwarded):
            hop = _parse_ip(entry)
            if hop is None or not self._is_trusted(hop):
                return _key(hop, entry)
        if forwarded:  # every hop is ours: the first one is as close as we get
            return _key(_parse_ip(forwarded[0]), forwarded[0])
        return _key(address, peer)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("["):  # "[2001:db8::1]:443", as some proxies write it
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # "203.0.113.5:4711"
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _key(address: IPAddress | None, raw: str) -> str:
    if address is None:
        return raw[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # "::ffff:203.0.113.5" is that IPv4 host
            return str(address.ipv4_mapped)
        # One IPv6 host usually holds a whole /64 and can hop between its
        # addresses at will: count the /64.
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
