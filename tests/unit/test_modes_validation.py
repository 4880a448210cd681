"""Service modes in the model: what each mode accepts, INVALID_ARGUMENT naming the field
for what it does not, and the API round trip (docs/modes.md)."""

from __future__ import annotations

import pytest

from xlb.dpd.v1 import datapath_pb2 as pb
from xlb.policy.v1 import policy_pb2
from xlb.types.v1 import types_pb2 as tpb
from xlbcore.errors import ValidationError
from xlbcore.service import Mode, fill_service, parse_service, parse_services


def msg(mode: int, snat: str = "", ep_port: int = 80) -> pb.Service:
    return pb.Service(vip="198.19.0.10", port=80, protocol=tpb.PROTOCOL_TCP, mode=mode,
                      snat_address=snat,
                      endpoints=[tpb.Endpoint(address="198.18.1.2", port=ep_port)])


@pytest.mark.parametrize("mode,snat,ep_port", [
    (tpb.MODE_FULLNAT, "198.18.9.1", 8080), (tpb.MODE_FULLNAT, "", 8080),
    (tpb.MODE_DSR, "", 80), (tpb.MODE_DSR_IPIP, "198.18.9.1", 80), (tpb.MODE_DSR_IPIP, "", 80),
])
def test_modes_round_trip_through_both_apis(mode, snat, ep_port):
    spec = parse_services([msg(mode, snat, ep_port)])[0]
    assert (spec.mode, spec.snat_addr) == (Mode(mode), snat)
    for cls in (pb.Service, policy_pb2.Service):
        assert parse_service(fill_service(cls(), spec)) == spec


@pytest.mark.parametrize("m,field", [
    (msg(tpb.MODE_DNAT, "198.18.9.1"), "services[0].snat_address"),
    (msg(tpb.MODE_DSR, "198.18.9.1"), "services[0].snat_address"),
    (msg(tpb.MODE_FULLNAT, "198.18.9"), "services[0].snat_address"),
    (msg(tpb.MODE_FULLNAT, "127.0.0.1"), "services[0].snat_address"),
    (msg(tpb.MODE_DSR, "", 8080), "services[0].endpoints[0].port"),
    (msg(tpb.MODE_DSR_IPIP, "", 8080), "services[0].endpoints[0].port"),
    (msg(9), "services[0].mode"),
])
def test_bad_mode_settings_name_the_field(m, field):
    with pytest.raises(ValidationError) as e:
        parse_services([m])
    assert str(e.value).startswith(field)


def test_the_examples_in_docs_modes_are_valid():
    """docs/modes.md's grpcurl bodies and its xlbctl document parse and validate as the
    daemons would take them."""
    import re
    from pathlib import Path

    import yaml
    from google.protobuf import json_format

    from policyd.cli_objects import from_doc

    text = (Path(__file__).resolve().parents[2] / "docs" / "modes.md").read_text()
    bodies = re.findall(r"-d '(\{.*?\})' \\", text, re.S)
    assert len(bodies) == 2
    modes = set()
    for body in bodies:
        req = json_format.Parse(body, pb.PutServicesRequest())
        for spec in parse_services(req.services):
            modes.add(spec.mode)
    assert modes == {Mode.FULLNAT, Mode.DSR_IPIP}
    (doc,) = re.findall(r"xlbctl apply -f - <<'EOF'\n(.*?)\nEOF", text, re.S)
    (obj,) = from_doc(yaml.safe_load(doc), "docs")
    spec = parse_service(obj.msg)
    assert spec.mode == Mode.FULLNAT and spec.endpoints
