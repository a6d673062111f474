"""The Ray Serve application as deployed from a config file, without starting Ray: the RayService
manifest's serveConfigV2 is a valid Serve config whose builder reserves one bundle per rank for
each replica, and bad arguments are refused naming the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llama3_dist.config import ConfigError
from llama3_dist.ray_serve import build_app_from_args, build_openai_app

REPO = Path(__file__).resolve().parents[2]


def engine_deployment(app):
    """The LLMServer deployment bound into the ingress (the first argument of its constructor)."""
    ingress = app._bound_deployment
    assert ingress.name == "OpenAIIngress"
    return ingress.init_args[0]._bound_deployment


def test_rayservice_config_builds_replicas_with_a_bundle_per_rank():
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((REPO / "cluster/kuberay-rayservice.yaml").read_text())
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    assert (module, name) == ("llama3_dist.ray_serve", "build_app_from_args")

    engine = engine_deployment(build_app_from_args(application["args"]))
    assert engine.name == "LLMServer" and engine._deployment_config.num_replicas == 2
    replica = engine._replica_config
    # rank 0's bundle also holds the replica's own CPU; rank 1 its GPU and CPU only
    assert replica.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.ray_actor_options["num_gpus"] == 0.0


def test_command_line_strings_are_converted_and_bad_values_named():
    engine = engine_deployment(
        build_app_from_args({"devices": "cpu", "tensor_parallel_size": "1", "num_replicas": "3", "replica_cpus": "2"})
    )
    assert engine._deployment_config.num_replicas == 3
    assert engine._replica_config.placement_group_bundles == [{"CPU": 2.0}]
    with pytest.raises(ConfigError, match="num_replicas must be a number, got 'two'"):
        build_app_from_args({"devices": "cpu", "num_replicas": "two"})
    with pytest.raises(ConfigError, match=r"devices must be 'cuda' or 'cpu'.*got 'tpu'"):
        build_openai_app(devices="tpu")
    with pytest.raises(ConfigError, match="routing must be one of prefix, round_robin, power_of_two, got 'random'"):
        build_openai_app(devices="cpu", routing="random")
    with pytest.raises(ConfigError, match="give num_replicas or autoscaling_config, not both"):
        build_openai_app(devices="cpu", num_replicas=2, autoscaling_config={"max_replicas": 4})
