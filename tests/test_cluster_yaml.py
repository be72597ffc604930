"""cluster.yaml files validate offline through Ray's own autoscaler schema and bootstrap."""

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    # GPU workers exist and install the project with its GPU extra
    if cfg["provider"]["type"] == "aws":
        types = cfg["available_node_types"]
        assert any(t.startswith("gpu") for t in types) and cfg["head_node_type"] in types
    assert any(".[gpu]" in c for c in cfg["setup_commands"])


def test_local_provider_bootstraps_offline():
    from ray.autoscaler._private.commands import _bootstrap_config

    cfg = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    out = _bootstrap_config(copy.deepcopy(cfg), no_config_cache=True)
    assert out["provider"]["type"] == "local" and set(out["available_node_types"])


def test_a_broken_cluster_config_is_rejected():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_a10g_x4"]["max_workers"] = "many"
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError, match="'many' is not of type 'integer'"):
        validate_config(prepare_config(cfg))
