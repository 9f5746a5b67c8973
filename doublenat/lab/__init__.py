"""Test and benchmark lab: stand-ins for the router and the VPN gateway that doublenat talks to."""
