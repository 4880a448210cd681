"""xlb as a bench target: xlb-dpd on the lb node, services programmed with PutServices
(`xlb`; `xlb-maglev`: every service with Maglev), or applied to xlb-policyd and reconciled
onto the node (`xlb-policyd`)."""

from __future__ import annotations

import time

import grpc

from bench.services import ServiceSpec, service_set
from bench.targets import Target, flush_conntrack, register
from lab.daemons import Dpd, Policyd
from lab.topology import Topology
from xlb.dpd.v1 import datapath_pb2 as dpb
from xlb.dpd.v1 import datapath_pb2_grpc as dgrpc
from xlb.policy.v1 import policy_pb2 as ppb
from xlb.policy.v1 import policy_pb2_grpc as pgrpc
from xlb.types.v1 import types_pb2 as tpb

BATCH = 5000
BIG = [("grpc.max_receive_message_length", 64 << 20),
       ("grpc.max_send_message_length", 64 << 20)]


def dpd_service(s: ServiceSpec, algorithm: tpb.Algorithm = tpb.ALGORITHM_ROUND_ROBIN,
                mode: tpb.Mode = tpb.MODE_DNAT, snat: str = "") -> dpb.Service:
    return dpb.Service(
        vip=s.vip, port=s.port, algorithm=algorithm, mode=mode, snat_address=snat,
        protocol=tpb.PROTOCOL_TCP if s.proto == "tcp" else tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address=e.ip, port=e.port) for e in s.endpoints],
    )


def policy_service(i: int, s: ServiceSpec) -> ppb.Service:
    return ppb.Service(
        name=f"svc-{i}", vip=s.vip, port=s.port,
        protocol=tpb.PROTOCOL_TCP if s.proto == "tcp" else tpb.PROTOCOL_UDP,
        endpoints=[tpb.Endpoint(address=e.ip, port=e.port) for e in s.endpoints],
    )


def start_dpd(topo: Topology, services: int) -> Dpd:
    size = max(16, services)
    dpd = Dpd("bench", topo.lb_ns, topo.lb_ifaces, topo.workdir,
              extra=["--max-services", str(size), "--max-backends", str(8 * size),
                     "--log-level", "warning"])
    return dpd.start()


@register
class XlbTarget(Target):
    """PutServices straight into the node's dpd."""

    name = "xlb"
    algorithm: tpb.Algorithm = tpb.ALGORITHM_ROUND_ROBIN
    mode: tpb.Mode = tpb.MODE_DNAT
    snat: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.dpd: Dpd | None = None

    def setup(self, topo, services, measured_vip, port, backends) -> None:  # type: ignore[no-untyped-def]
        self._remember(topo, measured_vip, port, backends)
        specs = [dpd_service(s, self.algorithm, self.mode, self.snat)
                 for s in service_set(services, measured_vip, port, backends)]
        self.dpd = start_dpd(topo, services)
        with grpc.insecure_channel(self.dpd.address) as ch:
            stub = dgrpc.DatapathStub(ch)
            t0 = time.monotonic()
            for k in range(0, len(specs), BATCH):
                stub.PutServices(dpb.PutServicesRequest(services=specs[k:k + BATCH]), timeout=300)
            self.program_seconds = time.monotonic() - t0

    def teardown(self) -> None:
        if self.dpd is not None:
            self.dpd.cleanup()
            self.dpd = None
        if self.topo is not None:
            flush_conntrack(self.topo, self.topo.lb_ns)


@register
class XlbMaglevTarget(XlbTarget):
    """As `xlb`, every service (fillers and the measured one) with Maglev: one table of
    XLB_MAGLEV_SIZE entries per service in maglev_v4_map."""

    name = "xlb-maglev"
    algorithm = tpb.ALGORITHM_MAGLEV
    control_plane = False  # traffic only: the CRR row with Maglev
    variant_of = "xlb"


@register
class XlbFullnatTarget(XlbTarget):
    """As `xlb`, every service in full-NAT (docs/modes.md) with its own SNAT address (the
    backends route to it via the lb, as to everything): the source becomes that address
    and the client's port (kept where free); the backends answer the node."""

    name = "xlb-fullnat"
    mode = tpb.MODE_FULLNAT
    snat = "198.18.99.1"
    control_plane = False  # traffic only: the CRR row with full-NAT
    variant_of = "xlb"


@register
class XlbPolicydTarget(XlbTarget):
    """One ApplyServices to policyd with every service, then wait until the node is SYNCED."""

    name = "xlb-policyd"
    traffic = False

    def __init__(self) -> None:
        super().__init__()
        self.policyd: Policyd | None = None

    def setup(self, topo, services, measured_vip, port, backends) -> None:  # type: ignore[no-untyped-def]
        self._remember(topo, measured_vip, port, backends)
        specs = service_set(services, measured_vip, port, backends)
        self.dpd = start_dpd(topo, services)
        self.policyd = Policyd(topo.workdir, db=topo.workdir / "bench-policyd.db",
                               resync_interval=30.0).start()
        with grpc.insecure_channel(self.policyd.address, options=BIG) as ch:
            policy = pgrpc.PolicyStub(ch)
            policy.RegisterNode(ppb.RegisterNodeRequest(
                node=ppb.Node(name="bench", address=self.dpd.address)), timeout=10)
            wait_synced(policy, 0, 60)
            services = [policy_service(i, s) for i, s in enumerate(specs)]
            t0 = time.monotonic()
            reply = policy.ApplyServices(ppb.ApplyServicesRequest(services=services),
                                         timeout=300)
            wait_synced(policy, reply.generation, 600)
            self.program_seconds = time.monotonic() - t0

    def teardown(self) -> None:
        if self.policyd is not None:
            self.policyd.stop()
            self.policyd = None
        if self.topo is not None:
            (self.topo.workdir / "bench-policyd.db").unlink(missing_ok=True)
        super().teardown()


def wait_synced(policy: pgrpc.PolicyStub, generation: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = policy.GetSyncStatus(ppb.GetSyncStatusRequest(node="bench"), timeout=10).nodes[0]
        if st.state == ppb.SYNC_STATE_SYNCED and st.observed_generation >= generation:
            return
        time.sleep(0.01)
    raise RuntimeError(f"node not SYNCED at generation {generation} within {timeout}s")
