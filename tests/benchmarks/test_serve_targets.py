"""The replicated benchmark's reading of `pipeline_adapter_loads_total` from Prometheus text."""

from __future__ import annotations

from benchmarks.serve_targets import parse_adapter_loads

METRICS = """\
# HELP pipeline_adapter_loads_total Adapter loads by replica
# TYPE pipeline_adapter_loads_total counter
pipeline_adapter_loads_total{adapter="a@1",replica="r-1"} 3.0
pipeline_adapter_loads_total{adapter="b@1",replica="r-1"} 2.0
pipeline_adapter_loads_total{adapter="a@1",replica="r-2"} 1.0
pipeline_adapter_loads_created{adapter="a@1",replica="r-1"} 1.7e+09
vllm:num_requests_running{model_name="base"} 0.0
"""


def test_loads_are_summed_per_replica_and_other_series_ignored():
    assert parse_adapter_loads(METRICS) == {"r-1": 5.0, "r-2": 1.0}
    assert parse_adapter_loads("pipeline_adapter_loads_total 7\n") == {"": 7.0}
    assert parse_adapter_loads("") == {}
