"""Test-wide setup: gevent patches the standard library before anything imports ssl."""

from gevent import monkey

monkey.patch_all()

# Lab fixtures (make_lab, lab) for every directory.
pytest_plugins = ["tests.lab_support"]
