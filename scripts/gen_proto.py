"""Generate Python gRPC code from proto/ into the xlb/ package (not committed)."""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            *protos,
        ]
    )
    if rc != 0:
        return rc
    for proto in protos:
        pkg = ROOT / pathlib.Path(proto).parent
        while pkg != ROOT:
            (pkg / "__init__.py").touch()
            pkg = pkg.parent
    return 0


if __name__ == "__main__":
    sys.exit(main())
