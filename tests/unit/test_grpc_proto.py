"""The committed gRPC modules (`lmaas_pb2*.py`) are what `make proto` generates from `lmaas.proto` now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PLATFORM = Path(__file__).resolve().parents[2] / "platform"
PROTO = Path("lmaas/serve/protocol/lmaas.proto")
GENERATED = ("lmaas_pb2.py", "lmaas_pb2.pyi", "lmaas_pb2_grpc.py")


def test_generated_modules_are_current(tmp_path: Path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the `test` extra")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PLATFORM), f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(PLATFORM / PROTO)],
        check=True, capture_output=True, text=True,
    )
    stale = [name for name in GENERATED if (tmp_path / PROTO.parent / name).read_text() != (PLATFORM / PROTO.parent / name).read_text()]
    assert not stale, f"{stale} differ from {PROTO}: run `make proto` and commit the result"


def test_generated_modules_import_with_the_installed_runtimes():
    from lmaas.serve.protocol import lmaas_pb2, lmaas_pb2_grpc

    assert lmaas_pb2.DESCRIPTOR.package == "lmaas.v1"
    assert {m.name for m in lmaas_pb2.DESCRIPTOR.services_by_name["Inference"].methods} == {"ListModels", "Complete", "Embed"}
    assert callable(lmaas_pb2_grpc.add_InferenceServicer_to_server)
