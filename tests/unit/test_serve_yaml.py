"""deployments/serve.yaml is a Serve config Ray accepts, and its `args` are valid `ServeAppArgs` with every knob spelled out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())


def test_ray_serve_schema_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(load()) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(load())
    app = config.applications[0]
    assert app.import_path == "lmaas.serve.deployments:build_app"
    assert app.runtime_env["working_dir"].startswith("local:///")


def test_serve_itself_can_call_the_import_path_with_the_yaml_args():
    """What `serve deploy deployments/serve.yaml` does before anything runs: import the builder, check it takes exactly
    one parameter, call it with the YAML's `args` (building the app graph needs no cluster)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr
    from ray.serve.deployment import Application

    app = load()["applications"][0]
    builder = import_attr(app["import_path"])
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app["args"]), Application)


def test_grpc_options_register_the_lmaas_servicer():
    from ray.serve.config import gRPCOptions

    from lmaas.serve.deployments import GRPC_SERVICER, grpc_options

    options = gRPCOptions(**load()["grpc_options"])
    assert options.grpc_servicer_functions == [GRPC_SERVICER] == grpc_options(options.port)["grpc_servicer_functions"]
    (add_servicer,) = options.grpc_servicer_func_callable  # importable, as Serve's proxy imports it
    assert add_servicer.__name__ == "add_InferenceServicer_to_server"


def test_args_are_valid_and_every_scaling_knob_is_in_the_yaml():
    from lmaas.serve.options import ScalingOptions, ServeAppArgs

    args = load()["applications"][0]["args"]
    parsed = ServeAppArgs.model_validate(args)
    assert parsed.models[0].min_replicas == 0
    knobs = set(ScalingOptions.model_fields)
    assert knobs <= set(args["models"][0]), knobs - set(args["models"][0])


def test_bad_args_name_the_field():
    from pydantic import ValidationError

    from lmaas.serve.options import ServeAppArgs

    with pytest.raises(ValidationError, match="max_replicas"):
        ServeAppArgs.model_validate({"models": [{"ref": "m", "min_replicas": 3, "max_replicas": 1}]})
    with pytest.raises(ValidationError, match="unique"):
        ServeAppArgs.model_validate({"models": [{"ref": "m"}, {"ref": "m@staging"}]})


def test_placement_options_reach_serve():
    from lmaas.serve.options import ServedModel

    options = ServedModel(ref="m", resources={"gpu_a100": 1}, max_replicas_per_node=1).deployment_options({})
    assert options["ray_actor_options"]["resources"] == {"gpu_a100": 1} and options["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in ServedModel(ref="m").deployment_options({})


def test_a_colocated_model_runs_in_the_gateway_with_its_resources_and_scaling():
    from pydantic import ValidationError

    from lmaas.serve.app import build_app
    from lmaas.serve.options import INGRESS_NAME, ServeAppArgs, ServedModel

    for bad, field in (({"multiplexed": True}, "multiplexed"), ({"canary": {"ref": "m:2"}}, "canary"), ({"min_replicas": 0}, "min_replicas")):
        with pytest.raises(ValidationError, match=field):
            ServeAppArgs.model_validate({"models": [{"ref": "m", "colocated": True, **bad}]})
    with pytest.raises(ValidationError, match="at most one model"):
        ServeAppArgs.model_validate({"models": [{"ref": "m", "colocated": True}, {"ref": "n", "colocated": True}]})

    app = build_app({"models": [{"ref": "m", "colocated": True, "num_cpus": 2, "num_gpus": 1, "min_replicas": 1, "max_replicas": 3},
                                {"ref": "e"}], "ingress": {"num_cpus": 0.1}}, applier=lambda env: None)
    gateway = app._bound_deployment
    assert gateway.name == INGRESS_NAME
    assert gateway.ray_actor_options["num_cpus"] == pytest.approx(2.1) and gateway.ray_actor_options["num_gpus"] == 1
    scaling = gateway._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    models = gateway.init_args[0]
    assert set(models) == {"e"}  # `m` has no deployment of its own; the gateway loads it
    assert gateway.init_kwargs["colocated"][:2] == ("m", "m")
    assert ServedModel(ref="m", colocated=True).serving_deployment == INGRESS_NAME
    assert ServedModel(ref="m").serving_deployment == "model-m"
