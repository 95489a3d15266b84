"""The replicated mode's settings, checked where they are loaded (no Ray, no engine)."""

import pytest

from config import load_config
from ground.errors import ConfigError
from serve.replicas.app import check_autoscaling


def test_serve_replica_keys_load_and_validate():
    cfg = load_config(None, ["serve.replicas=3", "serve.routing=round_robin", "serve.autoscaling.min_replicas=1",
                             "serve.autoscaling.max_replicas=4", "serve.autoscaling.target_ongoing_requests=2.5"])
    assert cfg.serve.replicas == 3 and cfg.serve.routing == "round_robin"
    assert cfg.serve.autoscaling.as_dict() == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.5}
    assert load_config(None, []).serve.autoscaling.as_dict() == {}  # default: a fixed replica count
    for bad in (["serve.replicas=0"], ["serve.routing=random"], ["serve.autoscaling.max_replicas=0"],
                ["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"],
                ["serve.autoscaling.target_ongoing_request=2"]):
        with pytest.raises(ConfigError):
            load_config(None, bad)


def test_autoscaling_dict_is_checked_before_ray_starts():
    assert check_autoscaling(None) is None and check_autoscaling({}) is None
    assert check_autoscaling({"max_replicas": 3}) == {"min_replicas": 1, "max_replicas": 3,
                                                      "target_ongoing_requests": 2.0}
    with pytest.raises(ConfigError, match="min_replicas <= max_replicas"):
        check_autoscaling({"min_replicas": 4, "max_replicas": 2})
    with pytest.raises(ConfigError, match="valid keys"):
        check_autoscaling({"max_replica": 2})
