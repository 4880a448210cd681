"""A datapath of in-memory maps: dpd's tables and API without a kernel.

Every map of the ABI exists with its configured size and its kernel semantics
(dpd/maps.py MemoryMap); there are no programs, so nothing is attached and no packet is
seen. Unit tests run dpd's real tables and servicer over it without root, and a
simulated node (``xlb-dpd --datapath memory``) serves the real API from a few MiB.
"""

from __future__ import annotations

import itertools

from dpd import abi as abi_mod
from dpd.loader import Datapath, Settings
from dpd.maps import Map, MemoryMap

_ids = itertools.count(1)


class MemoryDatapath(Datapath):
    kind = "memory"

    def __init__(self, settings: Settings, ncpus: int = 2) -> None:
        abi = abi_mod.load()
        maps: dict[str, Map] = {name: MemoryMap(spec, ncpus)
                                for name, spec in abi.map_specs(settings.macros()).items()}
        super().__init__(settings, abi, maps, reused=False,
                         datapath_id=f"memory-{next(_ids)}")
