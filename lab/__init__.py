"""Network-namespace lab for xlb: topologies, test servers and clients.

Everything here builds and tears down network namespaces and veth pairs that use only
addresses from 198.18.0.0/15, and removes all of it again (also on failure).
"""

from lab.netns import NetnsError
from lab.topology import Topology, cleanup_leftovers

__all__ = ["NetnsError", "Topology", "cleanup_leftovers"]
