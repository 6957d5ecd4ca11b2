"""scripts/sim_scheduler.py: the policy simulation runs every request to completion on the virtual clock."""

from inlaid.bench.workload import SAMPLE_TASKS, WorkloadSpec

from ..conftest import load_script


def test_simulation_completes_every_request_under_every_variant():
    sim = load_script("sim_scheduler")
    spec = WorkloadSpec(40, pattern="powerlaw", arrival="gamma", rate=20.0, cv=2.0, task_lengths=SAMPLE_TASKS, seed=1)
    requests = {r.request_id: r for r in sim.generate(spec)}
    for policy, slo in (("fcfs", (None, None)), ("inlaid", (None, None)), ("inlaid", (2.0, 10.0))):
        timelines = sim.simulate(policy, spec, 8, sim.StepModel(), slo)
        assert sorted(t.request_id for t in timelines) == sorted(requests)
        for t in timelines:
            r = requests[t.request_id]
            assert t.output_tokens == r.output_len and t.arrival_s == r.arrival_s
            assert t.arrival_s < t.first_token_s <= t.finish_s
