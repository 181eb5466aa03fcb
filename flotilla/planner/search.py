"""Plan search: TP x PP x replicas x max_num_seqs (and the KV budget), ranked by goodput under an SLO.

For every tensor size (powers of two and the sizes the model's heads allow, up to a node) and pipeline size
(powers of two, up to the cluster), every replica count that fits (only the most that fit under saturating
load on dedicated devices, where fewer replicas only lose), every ``max_num_seqs`` candidate and, on a shared
CPU node, two thread counts per rank (its share of the cores and half of it):

1. **Shape checks**: the heads / KV heads / MLP must split ``tp`` ways, the layers ``pp`` ways; TP stays
   inside a node; the plan needs no more devices than the hardware has.
2. **Memory**: weights, activations and the runtime reserve per rank; the KV budget is what holds
   ``max_num_seqs`` sequences of the workload's longest length, or all that is left if less (then
   concurrency is KV-bound and the simulator preempts). A plan whose KV cannot hold one ``max_model_len``
   sequence is rejected (the engine refuses to start then).
3. **Estimate**: a closed-form steady state (decode batch plus amortized prefill) ranks the candidates;
   those whose estimated TPOT is over 3x the SLO are rejected without simulating.
4. **Simulation** of the best by the estimate, ``max_simulations`` distinct replica simulations
   (``flotilla.planner.simulate``, one replica, its share of the load), scaled to the replicas. Plans are ranked by goodput; plans that miss the SLO's
   percentiles are listed as rejected ("SLO: ...") after those that meet it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from flotilla.config import CacheConfig, SchedulerConfig
from flotilla.planner.cost import Calibration, CostModel, Plan, StepWork
from flotilla.planner.hardware import Hardware
from flotilla.planner.metrics import SLO, PlanMetrics, plan_metrics
from flotilla.planner.model import ModelDesc
from flotilla.planner.simulate import SimResult, simulate
from flotilla.planner.workload import Workload

GiB = 1 << 30
MAX_NUM_SEQS = (4, 8, 16, 32, 64, 128, 256)
DEFAULT_MAX_MODEL_LEN = 8192  # the engine's default cap (EngineArgs)
SERVER_RESERVE = 1 * GiB  # a CPU node's HTTP server and engine core processes
CPU_RANK_RESERVE = GiB // 2  # a CPU rank's Python + torch runtime
AUTO_RATE_FACTOR = 1.5  # auto load: requests are sent at this multiple of the estimated capacity


@dataclass
class Evaluated:
    """One candidate: its ``plan``, memory per device (bytes), KV blocks, and either ``metrics`` (the
    deployment's, simulated) or ``rejected`` (why: shape, devices, memory or SLO). ``estimate``: the
    closed-form output tokens/s; ``load``: the (rate, concurrency) one replica was simulated at."""

    plan: Plan | None
    label: str
    memory_per_device: int = 0
    kv_blocks: int = 0
    metrics: PlanMetrics | None = None
    rejected: str | None = None
    estimate: float = 0.0
    load: tuple[float | None, int | None] = (None, None)
    sim: SimResult | None = None

    @property
    def ok(self) -> bool:
        return self.rejected is None and self.metrics is not None


@dataclass
class PlanReport:
    """The search's answer: ``ranked`` (plans that meet the SLO, best goodput first), ``rejected`` (every
    other candidate with its reason; simulated SLO misses first, by goodput), and the inputs."""

    model: ModelDesc
    hardware: Hardware
    workload: Workload
    slo: SLO
    calibration: Calibration
    dtype: str
    ranked: list[Evaluated] = field(default_factory=list)
    rejected: list[Evaluated] = field(default_factory=list)

    @property
    def best(self) -> Evaluated | None:
        """The plan to deploy: the best that meets the SLO, else the best simulated one (None: nothing fits)."""
        if self.ranked:
            return self.ranked[0]
        simulated = [e for e in self.rejected if e.metrics is not None]
        return simulated[0] if simulated else None


def search(model: ModelDesc, hardware: Hardware, workload: Workload, slo: SLO, calibration: Calibration | None = None,
           *, tp: list[int] | None = None, pp: list[int] | None = None, replicas: list[int] | None = None,
           max_num_seqs: list[int] | None = None, dtype: str = "auto", quantization: str | None = None,
           max_num_batched_tokens: int = 2048, max_simulations: int = 12) -> PlanReport:
    """Search the plans (see the module docstring). ValueError for inputs no plan can satisfy (a dtype
    the hardware lacks, a workload longer than the model's context)."""
    calibration = calibration or Calibration.prior(hardware)
    run_dtype = model.runtime_dtype(hardware.device_kind, hardware.bf16_native, dtype)
    if not hardware.supports(run_dtype):
        raise ValueError(f"{hardware.name} has no {run_dtype} rate; pass --dtype with one it lists")
    if workload.max_seq_len > model.max_position_embeddings:
        raise ValueError(f"the workload's longest request ({workload.max_seq_len} tokens) exceeds {model.name}'s "
                         f"context ({model.max_position_embeddings})")
    block = 16
    max_len = max(min(model.max_position_embeddings, DEFAULT_MAX_MODEL_LEN), -(-workload.max_seq_len // block) * block)
    report = PlanReport(model, hardware, workload, slo, calibration, run_dtype)
    candidates = []
    for t, p in _shapes(model, hardware, tp, pp, report):
        most = hardware.num_devices // (t * p)
        # Saturating load on dedicated devices: every replica sees the same load, fewer replicas only lose.
        counts = replicas or ([most] if workload.auto_concurrency and not hardware.shared else range(1, most + 1))
        for r in counts:
            if t * p * r > hardware.num_devices:
                report.rejected.append(Evaluated(None, f"TP{t} PP{p} x{r}", rejected=(
                    f"devices: needs {t * p * r}, {hardware.name} has {hardware.num_devices}")))
                continue
            for seqs in max_num_seqs or MAX_NUM_SEQS:
                plan = Plan(tp=t, pp=p, replicas=r, max_num_seqs=seqs, dtype=run_dtype, max_model_len=max_len,
                            max_num_batched_tokens=max_num_batched_tokens, quantization=quantization, block_size=block)
                for threads in _thread_options(hardware, plan):
                    candidates.append(_size(model, hardware, workload, replace(plan, num_threads=threads),
                                            calibration))
    feasible = [c for c in candidates if c.rejected is None]
    report.rejected.extend(c for c in candidates if c.rejected is not None)
    for c in feasible:
        c.estimate, tpot = _estimate(model, hardware, workload, c, calibration)
        c.load = workload.replica_load(c.plan.replicas, c.plan.max_num_seqs,
                                       AUTO_RATE_FACTOR * c.estimate / c.plan.replicas / workload.output_len)
        if tpot > 3 * slo.tpot_limit:
            c.rejected = f"SLO (estimate): TPOT ~{tpot * 1e3:.0f} ms > 3x {slo.tpot_limit * 1e3:.0f} ms"
    feasible.sort(key=lambda c: (c.rejected is None, c.estimate), reverse=True)
    cache: dict = {}
    for c in feasible:
        if c.rejected is not None:
            continue
        if len(cache) >= max_simulations and _sim_key(model, hardware, workload, calibration, c) not in cache:
            c.rejected = f"not simulated: {max_simulations} better estimates ahead"
            continue
        _simulate(model, hardware, workload, slo, calibration, c, cache)
        misses = slo.violations(c.metrics)
        c.rejected = f"SLO: {'; '.join(misses)}" if misses else None
    report.ranked = sorted((c for c in feasible if c.ok), key=_rank_key)
    report.rejected = (sorted((c for c in feasible if c.metrics is not None and not c.ok), key=_rank_key)
                       + [c for c in feasible if c.metrics is None] + report.rejected)
    return report


def _rank_key(c: Evaluated):
    m = c.metrics
    return (-round(m.goodput, 9), -round(m.output_throughput, 6), c.plan.num_devices, m.tpot_p99)


def _powers(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def _shapes(model: ModelDesc, hw: Hardware, tps, pps, report: PlanReport):
    """(tp, pp) pairs to size; shape problems go to ``report.rejected``."""
    tp_sizes = tps or sorted(set(_powers(hw.devices_per_node)) | {t for t in _fitting_tp(model)
                                                                  if t <= hw.devices_per_node})
    pp_sizes = pps or _powers(min(hw.num_devices, model.num_layers))
    for t in tp_sizes:
        for p in pp_sizes:
            label = f"TP{t} PP{p}"
            problem = model.tp_problem(t) or model.pp_problem(p)
            if problem is None and t > hw.devices_per_node:
                problem = f"TP {t} spans nodes ({hw.devices_per_node} devices per node)"
            if problem is None and t * p > hw.num_devices:
                problem = f"devices: needs {t * p}, {hw.name} has {hw.num_devices}"
            if problem is not None:
                report.rejected.append(Evaluated(None, label, rejected=problem))
            else:
                yield t, p


def _thread_options(hw: Hardware, plan: Plan) -> list[int | None]:
    """Torch threads per rank to try on a shared node: its share of the cores, and half of it (on a busy
    machine fewer threads can be faster, and they leave cores to the server's own processes)."""
    if not hw.shared:
        return [None]
    share = hw.threads_per_rank(math.ceil(plan.num_devices / hw.nodes))
    return sorted({share, max(1, share // 2)}, reverse=True)


def _fitting_tp(model: ModelDesc) -> list[int]:
    return [t for t in range(1, model.num_heads + 1) if model.tp_problem(t) is None]


def _size(model: ModelDesc, hw: Hardware, workload: Workload, plan: Plan, calib: Calibration) -> Evaluated:
    """Memory and KV budget of ``plan``; ``rejected`` when it does not fit."""
    cost = CostModel(model, hw, plan, calib)
    per_block = max(cost.kv_bytes_per_block(s) for s in range(plan.pp))
    blocks_per_seq = -(-workload.max_seq_len // plan.block_size)
    want_blocks = plan.max_num_seqs * blocks_per_seq + 1
    min_blocks = -(-plan.max_model_len // plan.block_size)
    fixed = [cost.weight_bytes(s) + cost.activation_bytes(s) + hw.reserved for s in range(plan.pp)]
    if hw.shared:  # the node's memory is pooled; every rank also runs a Python + torch process
        ranks = cost.ranks_on_node
        pool = hw.memory * hw.memory_utilization - SERVER_RESERVE * plan.replicas / hw.nodes
        free_per_rank = (pool - ranks * (sum(fixed) / plan.pp + CPU_RANK_RESERVE)) / ranks
    else:
        free_per_rank = hw.memory * hw.memory_utilization - max(fixed)
    blocks = min(max(want_blocks, min_blocks), int(max(0.0, free_per_rank) // per_block))
    label = plan.label
    if blocks < min_blocks:
        usable = (hw.memory * hw.memory_utilization / (cost.ranks_on_node if hw.shared else 1)) / GiB
        if free_per_rank <= 0:
            return Evaluated(plan, label, rejected=(
                f"memory: weights and activations need {max(fixed) / GiB:.1f} GiB per rank, "
                f"{usable:.1f} GiB usable"))
        return Evaluated(plan, label, rejected=(
            f"memory: the {free_per_rank / GiB:.2f} GiB per rank left for the KV cache hold {blocks} blocks, fewer "
            f"than one {plan.max_model_len}-token sequence needs ({min_blocks})"))
    threads = (plan.num_threads or hw.threads_per_rank(cost.ranks_on_node)) if hw.shared else None
    plan = replace(plan, kv_cache_bytes=blocks * per_block, num_threads=threads)
    cost = CostModel(model, hw, plan, calib)
    memory = max(cost.memory_per_rank(s) for s in range(plan.pp)) + (CPU_RANK_RESERVE if hw.shared else 0)
    return Evaluated(plan, label, memory_per_device=memory, kv_blocks=blocks)


def _estimate(model: ModelDesc, hw: Hardware, workload: Workload, c: Evaluated, calib: Calibration):
    """(deployment output tokens/s, TPOT) of a steady state: ``B`` sequences decoding at the mean context,
    each step also prefilling ``B * isl / osl`` prompt tokens (the prompts of the requests that replace
    finished ones), ``B / pp`` sequences per micro-batch."""
    plan = c.plan
    cost = CostModel(model, hw, plan, calib)
    rate, conc = workload.replica_load(plan.replicas, plan.max_num_seqs)
    kv_seqs = max(1, c.kv_blocks // -(-workload.max_seq_len // plan.block_size))
    batch = min(plan.max_num_seqs, conc or plan.max_num_seqs, kv_seqs)
    micro = max(1, batch // plan.pp)
    prefill = min(plan.max_num_batched_tokens, max(1, round(micro * workload.input_len / workload.output_len)))
    ctx = workload.input_len + workload.output_len // 2
    work = StepWork.of([(1, ctx, True)] * micro + [(prefill, 0, False)])
    times = cost.stage_times(work)
    cycle = max(plan.pp * max(times), cost.step_time(work)) if plan.pp > 1 else times[0]
    tokens_per_s = micro * plan.pp / cycle
    if rate is not None:
        tokens_per_s = min(tokens_per_s, rate * workload.output_len)
    return tokens_per_s * plan.replicas, cycle


def _sim_key(model, hw, workload: Workload, calib, c: Evaluated) -> tuple:
    """What one replica's simulation depends on: plans with equal keys share it."""
    plan = c.plan
    ranks = CostModel(model, hw, plan, calib).ranks_on_node
    return plan.tp, plan.pp, plan.max_num_seqs, plan.num_threads, c.kv_blocks, c.load, ranks


def _simulate(model, hw, workload: Workload, slo: SLO, calib, c: Evaluated, cache: dict) -> None:
    """Simulate one replica of ``c.plan`` at ``c.load``; memoized on what the replica sees."""
    key = _sim_key(model, hw, workload, calib, c)
    if key not in cache:
        cache[key] = run_replica(CostModel(model, hw, c.plan, calib), workload, c.kv_blocks, *c.load)
    c.sim = cache[key]
    c.metrics = plan_metrics(c.sim.results, c.sim.duration, slo).scaled(c.plan.replicas)


def run_replica(cost: CostModel, workload: Workload, num_blocks: int, rate: float | None,
                concurrency: int | None) -> SimResult:
    """Simulate one replica of ``cost.plan``: requests sent at ``rate`` req/s (None: at once), at most
    ``concurrency`` in flight."""
    plan = cost.plan
    n = workload.num_requests_for(rate, concurrency)
    requests = workload.requests(n, cost.model.vocab_size)
    sched = SchedulerConfig(max_num_batched_tokens=plan.max_num_batched_tokens, max_num_seqs=plan.max_num_seqs,
                            max_model_len=plan.max_model_len)
    cache = CacheConfig(block_size=plan.block_size, num_blocks=num_blocks)
    return simulate(cost, plan.pp, sched, cache, num_blocks, requests, workload.arrival_times(n, rate),
                    max_concurrency=concurrency)


def predict(model: ModelDesc, hardware: Hardware, workload: Workload, slo: SLO, calibration: Calibration,
            evaluated: Evaluated) -> PlanMetrics:
    """The deployment's simulated metrics for a sized plan at its load under ``calibration`` (what
    ``refit`` fits)."""
    sim = run_replica(CostModel(model, hardware, evaluated.plan, calibration), workload, evaluated.kv_blocks,
                      *evaluated.load)
    return plan_metrics(sim.results, sim.duration, slo).scaled(evaluated.plan.replicas)


def evaluate(model: ModelDesc, hardware: Hardware, workload: Workload, slo: SLO, calibration: Calibration,
             plan: Plan) -> Evaluated:
    """One given plan sized and simulated, without the search's pruning (benchmarks compare every plan);
    ``rejected`` is set when its shape does not split (heads, layers), it does not fit or misses the SLO."""
    problem = model.tp_problem(plan.tp) or model.pp_problem(plan.pp)
    if problem is not None:
        return Evaluated(plan, plan.label, rejected=problem)
    c = _size(model, hardware, workload, plan, calibration)
    if c.rejected is None:
        c.estimate, _ = _estimate(model, hardware, workload, c, calibration)
        c.load = workload.replica_load(plan.replicas, plan.max_num_seqs,
                                       AUTO_RATE_FACTOR * c.estimate / plan.replicas / workload.output_len)
        _simulate(model, hardware, workload, slo, calibration, c, {})
        misses = slo.violations(c.metrics)
        c.rejected = f"SLO: {'; '.join(misses)}" if misses else None
    return c
