"""Tensor-parallel layers equal their unsharded versions; process groups; launcher rank discovery.

Multi-process tests spawn real ranks over Gloo on 127.0.0.1 (``rank_runner.run_ranks``);
each rank builds the unsharded reference from the same seed, loads the full weights through the sharded
layer's ``weight_loader`` and reports the max difference of its output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flotilla.distributed.launch import LaunchInfo, detect_launch, expand_nodelist
from flotilla.distributed.parallel_state import GroupCoordinator, destroy_distributed, get_pp_group, \
    get_tp_group, init_distributed
from rank_runner import run_ranks

TOL = 1e-5
TIMEOUT_S = 180


# ---- per-rank checks (module level: spawned ranks import them) ------------------------------------------
def _rand(*shape) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32)


def _err(got: torch.Tensor, expect: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (summation order differs across ranks)."""
    if got.shape != expect.shape:
        return float("inf")
    return ((got - expect).abs().max() / expect.abs().max().clamp_min(1.0)).item()


def _check_column(rank: int) -> dict[str, float]:
    from flotilla.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear
    tp = get_tp_group()
    torch.manual_seed(0)
    x, w, b = _rand(5, 12), _rand(24, 12), _rand(24)
    ref = F.linear(x, w, b)  # (5, 24)
    part = 24 // tp.world_size
    out = {}
    for gather in (False, True):
        layer = ColumnParallelLinear(12, 24, bias=True, gather_output=gather)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        expect = ref if gather else ref[:, rank * part:(rank + 1) * part]
        out[f"column gather={gather}"] = _err(layer(x), expect)
    wg, wu = _rand(24, 12), _rand(24, 12)
    merged = MergedColumnParallelLinear(12, [24, 24])
    merged.weight.weight_loader(merged.weight, wg, 0)
    merged.weight.weight_loader(merged.weight, wu, 1)
    sl = slice(rank * part, (rank + 1) * part)
    expect = torch.cat([F.linear(x, wg)[:, sl], F.linear(x, wu)[:, sl]], dim=-1)  # (5, 2 * 24 / tp)
    out["merged column"] = _err(merged(x), expect)
    return out


def _check_mlp(rank: int) -> dict[str, float]:
    """gate/up column-parallel -> SiluAndMul -> row-parallel with bias == the unsharded MLP."""
    from flotilla.layers.activation import SiluAndMul
    from flotilla.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    torch.manual_seed(1)
    x, wg, wu, wd, bd = _rand(7, 12), _rand(36, 12), _rand(36, 12), _rand(12, 36), _rand(12)
    ref = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd, bd)  # (7, 12)
    gate_up = MergedColumnParallelLinear(12, [36, 36])
    gate_up.weight.weight_loader(gate_up.weight, wg, 0)
    gate_up.weight.weight_loader(gate_up.weight, wu, 1)
    down = RowParallelLinear(36, 12, bias=True)
    down.weight.weight_loader(down.weight, wd)
    down.bias.weight_loader(down.bias, bd)
    mlp = _err(down(SiluAndMul()(gate_up(x))), ref)
    # Row-parallel alone: this rank's input slice in, the full output (bias once) out.
    tp = get_tp_group()
    xi = _rand(7, 36)
    part = 36 // tp.world_size
    row = _err(down(xi[:, rank * part:(rank + 1) * part]), F.linear(xi, wd, bd))
    return {"mlp": mlp, "row with bias": row}


def _check_qkv(rank: int, heads: int, kv_heads: int, bias: bool) -> float:
    """Each rank's fused q|k|v slice equals the matching heads of the unsharded projections."""
    from flotilla.layers.linear import QKVParallelLinear
    tp = get_tp_group()
    d, hidden = 4, 16
    torch.manual_seed(2)
    x = _rand(6, hidden)
    wq, wk, wv = _rand(heads * d, hidden), _rand(kv_heads * d, hidden), _rand(kv_heads * d, hidden)
    bq, bk, bv = _rand(heads * d), _rand(kv_heads * d), _rand(kv_heads * d)
    layer = QKVParallelLinear(hidden, d, heads, kv_heads, bias=bias)
    for sid, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        layer.weight.weight_loader(layer.weight, w, sid)
        if bias:
            layer.bias.weight_loader(layer.bias, b, sid)
    q, k, v = (F.linear(x, w, b if bias else None) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    h = heads // tp.world_size
    kv_head = rank * kv_heads // tp.world_size  # first KV head of this rank (replicated when kv < tp)
    kvh = max(1, kv_heads // tp.world_size)
    expect = torch.cat([q[:, rank * h * d:(rank + 1) * h * d], k[:, kv_head * d:(kv_head + kvh) * d],
                        v[:, kv_head * d:(kv_head + kvh) * d]], dim=-1)
    assert layer.num_heads == h and layer.num_kv_heads == kvh
    return _err(layer(x), expect)


def _check_vocab(rank: int) -> dict[str, float]:
    from flotilla.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    vocab, dim = 13, 8  # 13 is not divisible by 2 or 3
    torch.manual_seed(3)
    emb_w, head_w = _rand(vocab, dim), _rand(vocab, dim)
    ids = torch.tensor([0, 12, 5, 6, 7, 4, 4, 11, 1, 2, 3, 8, 9, 10])
    hidden = _rand(4, dim)
    emb = VocabParallelEmbedding(vocab, dim)
    emb.weight.weight_loader(emb.weight, emb_w)
    untied = ParallelLMHead(vocab, dim)
    untied.weight.weight_loader(untied.weight, head_w)
    tied = ParallelLMHead(vocab, dim, tied_to=emb)
    return {"embedding": _err(emb(ids), F.embedding(ids, emb_w)),
            "lm head untied": _err(untied(hidden), hidden @ head_w.T),
            "lm head tied": _err(tied(hidden), hidden @ emb_w.T)}


# (heads, kv_heads) per TP size: KV heads sharded, replicated (fewer KV heads than ranks) and MQA.
QKV_CASES = {2: [(4, 2), (4, 1), (6, 6)], 3: [(6, 3), (6, 1), (9, 3)]}


def _all_layer_checks(rank: int) -> dict[str, float]:
    tp = get_tp_group().world_size
    out = {**_check_column(rank), **_check_mlp(rank), **_check_vocab(rank)}
    for heads, kv in QKV_CASES[tp]:
        for bias in (False, True):
            out[f"qkv {heads}h/{kv}kv bias={bias}"] = _check_qkv(rank, heads, kv, bias)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3])
def test_sharded_layers_equal_unsharded(tp):
    results = run_ranks(_all_layer_checks, tp_size=tp, timeout_s=TIMEOUT_S)
    for rank, diffs in enumerate(results):
        bad = {k: v for k, v in diffs.items() if not v < TOL}
        assert not bad, f"rank {rank} of {tp}: {bad}"


def test_qkv_rejects_indivisible_heads():
    """At TP 1 every head count works; the divisibility rules are checked against the TP size."""
    from flotilla.layers.linear import QKVParallelLinear
    layer = QKVParallelLinear(16, 4, 6, 2)
    assert (layer.num_heads, layer.num_kv_heads, layer.kv_replicas) == (6, 2, 1)


# ---- process groups (tp=2 x pp=2 on 4 ranks) -------------------------------------------------------------
def _check_groups(rank: int) -> dict:
    from flotilla.distributed.parallel_state import get_world_group
    tp, pp, world = get_tp_group(), get_pp_group(), get_world_group()
    info = {"tp": tp.ranks, "pp": pp.ranks, "world": world.ranks, "tp_rank": tp.rank_in_group,
            "pp_rank": pp.rank_in_group, "pp_first": pp.is_first_rank, "pp_last": pp.is_last_rank,
            "pp_first_rank": pp.first_rank, "pp_last_rank": pp.last_rank}
    info["tp_sum"] = tp.all_reduce(torch.tensor([float(rank)])).item()
    info["tp_gather"] = tp.all_gather(torch.tensor([[rank]]), dim=1).tolist()
    info["tp_bytes"] = tp.broadcast_bytes(f"from {rank}".encode() if tp.rank_in_group == 1 else None, src=1)
    info["world_bytes"] = world.broadcast_bytes(b"plan" if rank == 0 else None, src=0)
    info["empty_bytes"] = pp.broadcast_bytes(b"" if pp.is_first_rank else None, src=0)
    if pp.is_first_rank:
        pp.send_tensors({"hidden": torch.full((3, 4), float(rank)), "ids": torch.arange(5) + rank,
                         "half": torch.ones(2, dtype=torch.bfloat16), "none": torch.empty(0, 4)})
    else:
        got = pp.recv_tensors()
        info["recv"] = {k: (str(v.dtype), list(v.shape), v.float().sum().item()) for k, v in got.items()}
    world.barrier()
    return info


@pytest.mark.slow
def test_groups_tp2_pp2():
    results = run_ranks(_check_groups, tp_size=2, pp_size=2, timeout_s=TIMEOUT_S)
    for rank, info in enumerate(results):
        tp_rank, pp_rank = rank % 2, rank // 2
        assert info["tp"] == [pp_rank * 2, pp_rank * 2 + 1]
        assert info["pp"] == [tp_rank, tp_rank + 2]
        assert info["world"] == [0, 1, 2, 3]
        assert (info["tp_rank"], info["pp_rank"]) == (tp_rank, pp_rank)
        assert (info["pp_first"], info["pp_last"]) == (pp_rank == 0, pp_rank == 1)
        assert (info["pp_first_rank"], info["pp_last_rank"]) == (tp_rank, tp_rank + 2)
        assert info["tp_sum"] == sum(info["tp"])
        assert info["tp_gather"] == [info["tp"]]
        assert info["tp_bytes"] == f"from {info['tp'][1]}".encode()
        assert info["world_bytes"] == b"plan" and info["empty_bytes"] == b""
        if pp_rank == 1:
            src = tp_rank  # the stage-0 rank of this pipeline
            assert info["recv"] == {"hidden": ("torch.float32", [3, 4], 12.0 * src),
                                    "ids": ("torch.int64", [5], 10.0 + 5 * src),
                                    "half": ("torch.bfloat16", [2], 2.0),
                                    "none": ("torch.float32", [0, 4], 0.0)}


def test_size_one_groups_are_no_ops():
    g = GroupCoordinator()
    x = torch.arange(4.0)
    assert g.all_reduce(x) is x and g.all_gather(x) is x and g.broadcast(x) is x
    assert g.broadcast_bytes(b"abc") == b"abc"
    g.barrier()
    g.send_tensors({"x": x})
    assert (g.rank, g.first_rank, g.last_rank, g.is_first_rank, g.is_last_rank) == (0, 0, 0, True, True)
    with pytest.raises(RuntimeError):
        g.recv_tensors()
    state = init_distributed(1, 0, 1, 1)
    assert state.tp.world_size == state.pp.world_size == 1
    destroy_distributed()
    with pytest.raises(ValueError):
        init_distributed(4, 0, 2, 1)
    with pytest.raises(ValueError):
        GroupCoordinator(rank_in_group=2, world_size=2)


# ---- launchers (pure) -------------------------------------------------------------------------------------
def test_no_launcher():
    assert detect_launch({"PATH": "/bin", "SLURM_JOB_ID": "5"}) is None


def test_torchrun_env():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    info = detect_launch(env)
    assert info == LaunchInfo(3, 4, 1, "10.0.0.5", 29400, "torchrun")
    assert info.init_method == "env://"  # torchrun's agent serves the store
    assert detect_launch(env, master_port=1234).master_port == 1234
    with pytest.raises(ValueError):
        detect_launch({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError):
        detect_launch({"RANK": "x", "WORLD_SIZE": "4"})


def test_mpirun_env():
    base = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect_launch(base)  # two nodes, nobody said where rank 0 is
    info = detect_launch({**base, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert info == LaunchInfo(2, 4, 0, "head", 4000, "mpirun")
    assert detect_launch(base, master_addr="h0", master_port=5000) == LaunchInfo(2, 4, 0, "h0", 5000, "mpirun")
    one_node = {**base, "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    assert detect_launch(one_node) == LaunchInfo(2, 4, 2, "127.0.0.1", 29500, "mpirun")


def test_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-09,12]"}
    assert detect_launch(env) == LaunchInfo(5, 8, 1, "gpu07", 29500, "srun")
    assert detect_launch({**env, "SLURM_NODELIST": "a1,b[2-3]"}).master_addr == "a1"
    assert detect_launch({**env, "MASTER_ADDR": "x", "MASTER_PORT": "7"}).master_addr == "x"
    assert detect_launch(env, master_addr="y").master_addr == "y"


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("a1,b[2-3],c") == ["a1", "b2", "b3", "c"]
    assert expand_nodelist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand_nodelist("n[9-11]") == ["n9", "n10", "n11"]
    for bad in ("node[01-03", "node]", "n[3-1]", "n[a-b]", ""):
        with pytest.raises(ValueError):
            expand_nodelist(bad)
