"""Test-wide setup: gevent patches the standard library before anything imports ssl."""

from gevent import monkey

monkey.patch_all()
