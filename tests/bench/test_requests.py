"""Prompt ids and adapter-name mapping: what every target is sent."""

import pytest

from inlaid.bench.requests import PROMPT_TOKEN_RANGE, Workload, map_adapters, prompt_ids, workload_from_spec, \
    workload_from_trace
from inlaid.bench.workload import Request, WorkloadSpec, sample_trace_path
from inlaid.errors import ConfigError


def test_prompt_ids_exact_length_seeded_and_in_range():
    request = Request(7, 0.0, "a", 33, 4)
    ids = prompt_ids(request, seed=1)
    assert len(ids) == 33 and ids == prompt_ids(request, seed=1)
    assert ids != prompt_ids(request, seed=2) and ids[:8] != prompt_ids(Request(8, 0.0, "a", 33, 4), 1)[:8]
    assert all(PROMPT_TOKEN_RANGE[0] <= i < PROMPT_TOKEN_RANGE[1] for i in ids)


def test_map_adapters_identity_then_natural_order():
    assert map_adapters(["sql", "math"], ["math", "sql", "chat"]) == {"sql": "sql", "math": "math"}
    served = [f"dummy-{i}" for i in (10, 2, 0, 1)]
    assert map_adapters(["adapter-0", "adapter-1", "adapter-2"], served) == {
        "adapter-0": "dummy-0", "adapter-1": "dummy-1", "adapter-2": "dummy-2"}
    with pytest.raises(ConfigError, match="uses 3 adapters but the target serves 2"):
        map_adapters(["x", "y", "z"], ["a", "b"])


def test_workloads_from_spec_and_trace_describe_themselves():
    spec = WorkloadSpec(20, pattern="powerlaw", num_adapters=5, rate=2.0)
    workload = workload_from_spec(spec)
    assert workload.adapter_names == [f"adapter-{i}" for i in range(5)]
    assert workload.params["num_adapters"] == 5 and workload.params["rate"] == 2.0
    assert workload.params["input_len"] == "8:512"
    trace = workload_from_trace(sample_trace_path())
    assert trace.params["pattern"] == "trace" and set(trace.adapter_names) <= {"sql", "math", "chat", "summarize",
                                                                               "translate"}
    with pytest.raises(ConfigError, match="outside"):
        Workload.of([Request(0, 0.0, "a", 1, 1)], ["b"])
