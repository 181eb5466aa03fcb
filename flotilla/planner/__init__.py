"""Automatic parallel plans: which tensor / pipeline sizes, replicas, ``max_num_seqs`` and KV budget serve a
model best on given hardware for a workload under a latency SLO, from a calibrated cost model and a
simulator that replays the workload through flotilla's own scheduler.

    from flotilla.planner import plan
    report = plan("llama-3.1-70b", hardware="8xh200", workload="isl=2000,osl=200", slo="ttft_p99=2s,tpot_p99=50ms")
    report.best.plan, report.best.metrics

Modules: ``model`` (a model's shape from its config), ``hardware`` / ``hardware_schema`` / ``measure``
(described or measured machines), ``cost`` (step time and memory of a plan), ``workload``, ``simulate`` (the
replay over the real scheduler), ``metrics`` (SLO, goodput), ``search`` (the ranked plans), ``calibration``
(stored overheads, refit from measured runs), ``probe`` (run plans for real), ``emit`` (a deployment file),
``report`` (the table), ``command`` (``flotilla plan``), ``api`` (this package's functions).
"""

__all__ = ["get_hardware", "load_deployment", "plan", "resolve_deployment"]


def __getattr__(name):
    if name in __all__:  # loaded on first use: ``flotilla plan``'s parser imports this package
        from flotilla.planner import api
        return getattr(api, name)
    raise AttributeError(f"module 'flotilla.planner' has no attribute {name!r}")
