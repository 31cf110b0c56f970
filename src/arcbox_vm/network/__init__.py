"""Sandbox networking: IP pool, TAP devices (netlink), nftables NAT, network namespaces."""
