"""The planner's cost model against FLOPs and bytes computed by hand for two configs: SmolLM2-135M (9 heads,
3 KV heads, tied embeddings) at TP 1, and the shipped Llama-3.1-8B config at TP 2 x PP 2. Pure Python."""

from __future__ import annotations

import pytest

from flotilla.planner.cost import Calibration, CostModel, Plan, StepWork
from flotilla.planner.hardware import Hardware, Link, Overheads
from flotilla.planner.model import desc_from_hf_config, load_model_desc

GiB = 1 << 30


def flat_hardware(flops=1e12, bw=1e11, link_bw=1e11, latency=1e-6, devices=8) -> Hardware:
    """Round numbers: every rate flat (no efficiency factor, no overheads)."""
    return Hardware(name="flat", source="test", device_kind="gpu", nodes=1, devices_per_node=devices, memory=80e9,
                    memory_bandwidth=bw, flops={"bfloat16": flops, "float32": flops / 2},
                    intra_node=Link(link_bw, latency), inter_node=Link(link_bw, latency),
                    overheads=Overheads(0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def smollm2():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192, architectures=["LlamaForCausalLM"])
    return desc_from_hf_config(cfg, "smollm2", "smollm2", "config")


def test_smollm2_parameters_and_divisibility(smollm2):
    # q 576x576 + k,v 2x576x192 + o 576x576 + gate/up/down 3x576x1536
    assert smollm2.layer_linear_params(1) == 331_776 + 221_184 + 331_776 + 2_654_208 == 3_538_944
    # tied table once (49152 x 576) + 30 layers x (linear + two norms) + the final norm
    assert smollm2.num_params == 28_311_552 + 30 * (3_538_944 + 1152) + 576 == 134_515_008
    assert "9 heads" in smollm2.tp_problem(2) and smollm2.tp_problem(3) is None
    assert smollm2.pp_problem(31) is not None and smollm2.stage_layers(4) == [8, 8, 7, 7]


def test_smollm2_decode_step_by_hand(smollm2):
    plan = Plan(tp=1, pp=1, replicas=1, max_num_seqs=4, dtype="bfloat16", max_model_len=2048)
    cost = CostModel(smollm2, flat_hardware(), plan, Calibration(0.0, 0.0, 0.0))
    work = StepWork.decode(batch=4, context=100)
    assert (work.num_tokens, work.num_sampled, work.attn_pairs, work.kv_read_tokens) == (4, 4, 404, 404)
    c = cost.stage_cost(work, 0)
    # linear: FLOP 2 x 4 x 3,538,944 x 30 = 849,346,560 (0.85 ms at 1 TFLOP/s) against bytes: weights
    # 30 x 3,538,944 x 2 = 212,336,640 + activations 4 tokens x 15,744 elements x 2 B x 30 = 3,778,560 at 100 GB/s
    assert c.linear == pytest.approx((212_336_640 + 3_778_560) / 1e11)
    # attention: FLOP 4 x 9 heads x 64 x 404 pairs x 30 = 27,924,480; KV bytes (404 read + 4 written) x
    # 23,040 B/token (2 x 30 layers x 3 KV heads x 64 x 2 B) = 9,400,320: memory-bound
    assert c.attention == pytest.approx(9_400_320 / 1e11)
    # LM head on 4 rows: 2 x 4 x 49152 x 576 = 226,492,416 FLOP vs 56,623,104 B of table + 786,432 B of
    # float32 logits; the sampler reads the logits once more
    assert c.lm_head == pytest.approx((56_623_104 + 786_432) / 1e11 + 786_432 / 1e11)
    assert c.comm == 0.0 and cost.step_time(work) == pytest.approx(c.total)


def test_smollm2_prefill_is_compute_bound(smollm2):
    plan = Plan(tp=1, pp=1, replicas=1, max_num_seqs=4, dtype="bfloat16", max_model_len=2048)
    cost = CostModel(smollm2, flat_hardware(), plan, Calibration(0.0, 0.0, 0.0))
    c = cost.stage_cost(StepWork.prefill(512), 0)
    # 2 x 512 x 3,538,944 x 30 FLOP = 108,716,359,680 at 1 TFLOP/s; attention 512 x 513 / 2 = 131,328 pairs
    assert c.linear == pytest.approx(108_716_359_680 / 1e12)
    assert c.attention == pytest.approx(4 * 9 * 64 * 131_328 * 30 / 1e12)


@pytest.fixture(scope="module")
def llama8b():
    return load_model_desc("llama-3.1-8b")


def test_llama8b_parameters_and_weights_per_rank(llama8b):
    assert llama8b.num_params == 1_050_673_152 + 32 * 218_112_000 + 4096 == 8_030_261_248
    # TP 2: q 4096x2048 + k,v 2x4096x(4 KV heads x 128) + o 2048x4096 + MLP 3x4096x7168
    assert llama8b.layer_linear_params(2) == 8_388_608 + 4_194_304 + 8_388_608 + 88_080_384 == 109_051_904
    layers = 16 * (109_051_904 + 8192) * 2
    half_table = 64_128 * 4096 * 2
    assert llama8b.weight_bytes(2, 2, 0, "bfloat16") == layers + half_table == 4_015_259_648
    assert llama8b.weight_bytes(2, 2, 1, "bfloat16") == layers + 8192 + half_table
    # int8: one byte per matmul weight plus a bf16 scale per output row; the table stays bf16
    rows = 2048 + 2 * 512 + 4096 + 2 * 7168 + 4096
    assert llama8b.weight_bytes(2, 2, 0, "bfloat16", "int8") == 16 * (109_051_904 + rows * 2 + 8192 * 2) + half_table


def test_llama8b_tp2_pp2_communication_and_kv(llama8b):
    hw = flat_hardware(link_bw=1e11, latency=1e-6)
    plan = Plan(tp=2, pp=2, replicas=1, max_num_seqs=8, dtype="bfloat16", max_model_len=8192, kv_cache_bytes=GiB)
    cost = CostModel(llama8b, hw, plan, Calibration(0.0, 0.0, 0.0))
    work = StepWork.decode(batch=8, context=1000)
    # one all-reduce of 8 x 4096 x 2 B = 65,536 B over 2 ranks: 2 alpha + 65,536 / 100 GB/s
    one = 2e-6 + 65_536 / 1e11
    # 16 layers x 2 all-reduces, plus the vocab-parallel embedding's on stage 0
    assert cost.stage_cost(work, 0).comm == pytest.approx(33 * one)
    # last stage: 32 all-reduces and the logits all-gather (8 rows x 128,256 x 2 B, half an all-reduce)
    assert cost.stage_cost(work, 1).comm == pytest.approx(32 * one + 0.5 * (2e-6 + 8 * 128_256 * 2 / 1e11))
    # the pipeline hop carries hidden + residual: 2 x 8 x 4096 x 2 B
    assert cost.hop_time(work) == pytest.approx(1e-6 + 131_072 / 1e11)
    # KV: 2 x 16 layers x 4 KV heads x 128 x 2 B = 32,768 B per token on a rank; 16-token blocks
    assert cost.kv_bytes_per_block(0) == 524_288 and cost.num_kv_blocks() == 2048
    assert cost.step_time(work) == pytest.approx(sum(cost.stage_times(work)) + cost.hop_time(work))
    # four equal micro-batches: fill + drain once, then one slowest stage each
    slowest = max(cost.stage_times(work))
    assert cost.pipeline_time(work, 4) == pytest.approx(cost.step_time(work) + 3 * slowest)


def test_overheads_and_scales_apply(smollm2):
    plan = Plan(tp=1, pp=2, replicas=1, max_num_seqs=4, dtype="bfloat16", max_model_len=2048)
    calib = Calibration(step=1e-3, per_seq=1e-4, per_layer=1e-5, kernel_scale=2.0)
    base = CostModel(smollm2, flat_hardware(), plan, Calibration(0.0, 0.0, 0.0))
    cost = CostModel(smollm2, flat_hardware(), plan, calib)
    work = StepWork.decode(4, 64)
    # stage 0 hosts the driver: step + per-sequence overheads; both stages pay per layer (15 each)
    assert cost.stage_cost(work, 0).overhead == pytest.approx(1e-3 + 4e-4 + 15e-5)
    assert cost.stage_cost(work, 1).overhead == pytest.approx(15e-5)
    assert cost.stage_cost(work, 1).linear == pytest.approx(2 * base.stage_cost(work, 1).linear)


def test_shared_cpu_node_splits_rates():
    hw = Hardware(name="cpu", source="test", device_kind="cpu", nodes=1, devices_per_node=4, shared=True,
                  memory=64e9, memory_bandwidth=100e9, flops={"float32": 400e9},
                  intra_node=Link(5e9, 2e-5), inter_node=Link(5e9, 2e-5))
    assert hw.matmul_rate("float32", 16, ranks_on_node=4) == pytest.approx(100e9)
    assert hw.bandwidth(ranks_on_node=2) == pytest.approx(50e9) and hw.threads_per_rank(2) == 2


def test_oversubscribed_node_pays_the_measured_sync_per_collective(smollm2):
    """TP 3 on a two-core shared node: every all-reduce (2 per layer, the embedding's, the logits' gather) and
    every pipeline hand-off waits the measured ``oversubscribed_sync``; TP 1 x 2 replicas (no collectives) and
    PP 2 (two ranks on two cores) do not."""
    import dataclasses
    hw = Hardware(name="cpu", source="test", device_kind="cpu", nodes=1, devices_per_node=2, shared=True,
                  memory=64e9, memory_bandwidth=100e9, flops={"bfloat16": 400e9},
                  intra_node=Link(5e9, 2e-5), inter_node=Link(5e9, 2e-5), overheads=Overheads(0.0, 0.0, 0.0))
    slow = dataclasses.replace(hw, oversubscribed_sync=1e-3)
    work = StepWork.decode(4, 64)

    def comm(hardware, tp=1, pp=1, replicas=1):
        plan = Plan(tp=tp, pp=pp, replicas=replicas, max_num_seqs=4, dtype="bfloat16", max_model_len=2048)
        cost = CostModel(smollm2, hardware, plan)
        return [cost.stage_cost(work, s).comm for s in range(pp)], [cost.hop_time(work, h) for h in range(pp - 1)]
    (base,), _ = comm(hw, tp=3)
    (over,), _ = comm(slow, tp=3)
    assert over - base == pytest.approx((2 * 30 + 1 + 1) * 1e-3)
    assert comm(slow, tp=1, replicas=2) == comm(hw, tp=1, replicas=2)
    assert comm(slow, pp=2) == comm(hw, pp=2)
    (_, hops_over), (_, hops) = comm(slow, pp=2, replicas=2), comm(hw, pp=2, replicas=2)
    assert hops_over[0] - hops[0] == pytest.approx(1e-3)  # four ranks on two cores


def test_serving_processes_slow_ranks_only_when_they_fill_the_cores(smollm2):
    """``host_cores`` 0.5 of two cores: one one-thread rank keeps its core (the server has the other); two
    ranks, or one rank with two threads, keep 1.5 cores between them (kernels 1/0.75 as long)."""
    hw = Hardware(name="cpu", source="test", device_kind="cpu", nodes=1, devices_per_node=2, shared=True,
                  memory=64e9, memory_bandwidth=100e9, flops={"bfloat16": 400e9},
                  intra_node=Link(5e9, 2e-5), inter_node=Link(5e9, 2e-5), overheads=Overheads(0.0, 0.0, 0.0))
    work = StepWork.decode(4, 64)

    def linear(host_cores, threads, replicas=1):
        plan = Plan(tp=1, pp=1, replicas=replicas, max_num_seqs=4, dtype="bfloat16", max_model_len=2048,
                    num_threads=threads)
        return CostModel(smollm2, hw, plan, Calibration(0.0, 0.0, 0.0, host_cores=host_cores)).stage_cost(work, 0)
    assert linear(0.5, 1).linear == linear(0.0, 1).linear
    assert linear(0.5, 2).linear == pytest.approx(linear(0.0, 2).linear / 0.75)
    assert linear(0.5, 1, replicas=2).linear == pytest.approx(linear(0.0, 1, replicas=2).linear / 0.75)


def test_refit_recovers_overheads_from_measured_runs():
    """Three runs of different batch sizes measured on a machine whose true step overhead is 4 ms and whose
    kernels are 1.5x slower than the roofline: the refit (starting from 1 ms, 1x) predicts them within 5%."""
    from flotilla.planner.calibration import Measured, refit
    from flotilla.planner.metrics import PlanMetrics

    def metrics(calib: Calibration, batch: int) -> PlanMetrics:
        step = calib.step + calib.per_seq * batch + calib.kernel_scale * (0.010 + 0.0005 * batch)
        return PlanMetrics(batch / step, batch / step / 100, 0.1, 0.2, step, step * 1.1, 0.0, 1.0, 10)

    truth = Calibration(step=4e-3, per_seq=2e-4, per_layer=0.0, kernel_scale=1.5)
    runs = [Measured(key=b, metrics=metrics(truth, b)) for b in (1, 8, 32)]
    start = Calibration(step=1e-3, per_seq=1e-4, per_layer=0.0)
    fitted = refit(runs, start, metrics)
    assert fitted.fitted_from == 3
    for b in (1, 8, 32):
        assert metrics(fitted, b).tpot_p50 == pytest.approx(metrics(truth, b).tpot_p50, rel=0.05)
    assert metrics(start, 32).tpot_p50 < 0.8 * metrics(truth, 32).tpot_p50  # the priors were well off
