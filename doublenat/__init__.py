"""doublenat: one NAT-PMP gateway in front of a MikroTik router and a VPN gateway.

Kept free of imports so the console script can monkey-patch before anything else loads.
"""

__version__ = "0.2.0"
