"""A real fleet on one machine for testing compose-rollout: N Docker Compose
instances (each with its own address and sshd) behind HAProxy, and a local
registry holding the demo app's v1, v2 and broken images.

    with Testbed(Path("/tmp/bed")) as bed:
        fleet = bed.fleet_file()
        ...
"""

from ._util import TestbedError
from .bed import Testbed, TestbedInstance
from .haproxy import HaproxyAdmin

__all__ = ["HaproxyAdmin", "Testbed", "TestbedError", "TestbedInstance"]
