"""The gRPC API's pieces without a server: the committed generated modules are current, fields and errors map like HTTP."""

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


def test_errors_map_to_the_status_code_of_their_http_status():
    import grpc

    from lmaas.errors import InvalidInputError, NotFoundError, UnreachableError
    from lmaas.serve.errors import grpc_status

    assert grpc_status(NotFoundError("model 'x' is not served")) == (grpc.StatusCode.NOT_FOUND, "model 'x' is not served")
    assert grpc_status(InvalidInputError("bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(UnreachableError("down"))[0] == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(RuntimeError("boom")) == (grpc.StatusCode.INTERNAL, "request failed: RuntimeError: boom")


def test_unset_proto_fields_keep_the_http_defaults():
    from lmaas.errors import InvalidInputError
    from lmaas.serve.grpc_api import completion_fields
    from lmaas.serve.protocol import lmaas_pb2 as pb
    from lmaas.serve.protocol.openai import CompletionRequest

    parsed = CompletionRequest.model_validate(completion_fields(pb.CompletionRequest(model="m", prompt="hi")))
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.seed, parsed.logprobs) == (16, 1.0, 1.0, None, None)
    parsed = CompletionRequest.model_validate(completion_fields(pb.CompletionRequest(model="m", prompt_token_ids=[1, 2], temperature=0, seed=3)))
    assert (parsed.prompt, parsed.temperature, parsed.seed) == ([1, 2], 0.0, 3)
    with pytest.raises(InvalidInputError, match="not both"):
        completion_fields(pb.CompletionRequest(model="m", prompt="hi", prompt_token_ids=[1]))
