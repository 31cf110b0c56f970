"""Sandbox networking: IP pool, TAP devices (netlink), nftables isolation and NAT (rules.py: pure;
firewall.py: runs nft), network namespaces."""
