"""Pipeline partitioning: layer ranges, which modules and tensors each stage owns, and a tiny Llama split
over real ranks (pipeline 2, and tensor 2 x pipeline 2) reproducing the single-process logits."""

from __future__ import annotations

import pytest
import torch

from flotilla.distributed.parallel_state import GroupCoordinator, destroy_distributed, get_pp_group, \
    init_parallel_state
from rank_runner import run_ranks
from flotilla.distributed.utils import describe_parallel_plan, get_pp_layer_range, pp_partition
from flotilla.layers.attention import AttentionContext, CommonAttentionMetadata, TorchPagedAttentionBackend
from flotilla.layers.pipeline import IntermediateTensors, PPMissingLayer
from flotilla.models.llama import LlamaForCausalLM
from flotilla.models.loader import ResolvedModel, iterate_weights, iterate_weights_filtered, load_hf_config

TIMEOUT_S = 240
BLOCK_SIZE, NUM_BLOCKS = 4, 16
BLOCKS = [3, 1, 7, 2, 5, 8]  # a scrambled block table: 24 slots for the 20-token prompt + 1 decode
PROMPT_LEN = 20


# ---- layer ranges ---------------------------------------------------------------------------------------
def test_even_split_earlier_stages_take_remainder():
    assert pp_partition(10, 4) == [3, 3, 2, 2]
    assert pp_partition(30, 2) == [15, 15]
    assert pp_partition(7, 1) == [7]
    assert [get_pp_layer_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [get_pp_layer_range(3, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]


def test_explicit_partition():
    assert [get_pp_layer_range(10, r, 3, [2, 5, 3]) for r in range(3)] == [(0, 2), (2, 7), (7, 10)]
    with pytest.raises(ValueError, match="sums to 9"):
        get_pp_layer_range(10, 0, 3, [2, 4, 3])
    with pytest.raises(ValueError, match="has 2 stages"):
        get_pp_layer_range(10, 0, 3, [5, 5])
    with pytest.raises(ValueError, match="positive"):
        get_pp_layer_range(10, 0, 3, [0, 5, 5])


def test_plan_description():
    assert describe_parallel_plan(30, 2, 2) == ["stage 0: ranks 0-1, layers 0-14 (15), embedding",
                                                "stage 1: ranks 2-3, layers 15-29 (15), norm, lm_head"]
    assert describe_parallel_plan(5, 1, 3) == ["stage 0: rank 0, layers 0-1 (2), embedding",
                                               "stage 1: rank 1, layers 2-3 (2)",
                                               "stage 2: rank 2, layers 4-4 (1), norm, lm_head"]


def test_bad_ranges():
    with pytest.raises(ValueError, match="at least one layer"):
        get_pp_layer_range(2, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        get_pp_layer_range(4, 2, 2)
    with pytest.raises(ValueError):
        get_pp_layer_range(0, 0, 1)


# ---- what a stage builds and reads (fake groups: construction does not communicate) ----------------------
def _config(num_layers: int = 4, tied: bool = False, vocab: int = 96):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.2, tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])


def _stage_model(cfg, pp_rank: int, pp_size: int, partition=None) -> LlamaForCausalLM:
    init_parallel_state(GroupCoordinator(), GroupCoordinator(rank_in_group=pp_rank, world_size=pp_size))
    try:
        return LlamaForCausalLM(cfg, pp_partition=partition)
    finally:
        destroy_distributed()


def _hf_names(cfg) -> list[str]:
    from flotilla.models.loader import expected_weight_names
    return sorted(expected_weight_names(cfg))


def test_stage_modules_and_wanted_weights():
    cfg = _config(num_layers=5, tied=False)
    first, last = _stage_model(cfg, 0, 2), _stage_model(cfg, 1, 2)
    assert list(first.local_layer_indices) == [0, 1, 2] and list(last.local_layer_indices) == [3, 4]
    assert isinstance(first.lm_head, PPMissingLayer) and isinstance(first.model.norm, PPMissingLayer)
    assert isinstance(last.model.embed_tokens, PPMissingLayer)
    assert all(isinstance(last.model.layers[i], PPMissingLayer) for i in range(3))
    names = _hf_names(cfg)
    got0 = {n for n in names if first.wants_weight(n)}
    got1 = {n for n in names if last.wants_weight(n)}
    assert not got0 & got1 and got0 | got1 == set(names)
    assert "model.embed_tokens.weight" in got0 and "lm_head.weight" in got1 and "model.norm.weight" in got1
    assert all(n.startswith(("model.layers.3.", "model.layers.4.")) for n in got1 - {"lm_head.weight",
                                                                                      "model.norm.weight"})
    assert not first.wants_weight("model.layers.0.self_attn.rotary_emb.inv_freq")
    # a stage's parameters are exactly the tensors it wants (fused names aside)
    n_params = sum(p.numel() for p in first.parameters()) + sum(p.numel() for p in last.parameters())
    assert n_params == sum(p.numel() for p in _stage_model(cfg, 0, 1).parameters())


def test_tied_embeddings_last_stage_wants_embedding():
    cfg = _config(num_layers=3, tied=True)
    first, middle, last = (_stage_model(cfg, r, 3) for r in range(3))
    for stage, wants in ((first, True), (middle, False), (last, True)):
        assert stage.wants_weight("model.embed_tokens.weight") is wants
        assert not stage.wants_weight("lm_head.weight")  # tied checkpoints may still carry it: ignored
    assert isinstance(middle.model.embed_tokens, PPMissingLayer) and isinstance(middle.lm_head, PPMissingLayer)
    assert isinstance(last.model.embed_tokens, PPMissingLayer)  # the head holds its own copy
    assert last.lm_head.weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert first.lm_head.__class__ is PPMissingLayer and first.model.embed_tokens.weight is not None


# ---- real ranks: stage outputs chained with send/recv equal the single-process logits ---------------------
def _step(model, kv, tokens: torch.Tensor, ctx_len: int) -> torch.Tensor | None:
    """One forward of ``tokens`` on top of ``ctx_len`` cached ones; logits (T, vocab) on the last stage."""
    pp, backend = get_pp_group(), TorchPagedAttentionBackend()
    t = len(tokens)
    pos = torch.arange(ctx_len, ctx_len + t)  # (T,)
    bt = torch.tensor([BLOCKS])  # (1, max_blocks)
    slots = bt[0, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE  # (T,)
    common = CommonAttentionMetadata(torch.tensor([t]), torch.tensor([ctx_len]), bt, slots, int(t == 1),
                                     BLOCK_SIZE, t, ctx_len + t)
    ctx = AttentionContext(backend, backend.build_metadata(common), kv)
    intermediate = None if pp.is_first_rank else IntermediateTensors.from_dict(pp.recv_tensors())
    out = model(tokens if pp.is_first_rank else None, pos, ctx, intermediate)
    if not pp.is_last_rank:
        pp.send_tensors(out.to_dict())
        return None
    return model.compute_logits(out)  # (T, vocab)


def _run_model(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Prefill all but the last token, then decode the last one; logits of every token (last stage)."""
    kv = {}
    for i in model.local_layer_indices:  # caches only for this stage's layers
        attn = model.model.layers[i].self_attn
        kv[i] = torch.zeros(TorchPagedAttentionBackend.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, attn.num_kv_heads,
                                                                       attn.head_dim))
    with torch.inference_mode():
        prefill = _step(model, kv, tokens[:-1], 0)
        decode = _step(model, kv, tokens[-1:], len(tokens) - 1)
    return None if prefill is None else torch.cat([prefill, decode])


def _stage_main(rank: int, model_dir: str, partition, tokens: torch.Tensor) -> dict:
    resolved = ResolvedModel(source=model_dir, kind="hf_dir", alias=None)
    cfg = load_hf_config(resolved)
    model = LlamaForCausalLM(cfg, pp_partition=partition).eval()
    read: list[str] = []

    def recorded(weights):
        for name, tensor in weights:
            read.append(name)
            yield name, tensor

    model.load_weights(recorded(iterate_weights_filtered(resolved, cfg, torch.float32, model.wants_weight)))
    return {"read": read, "layers": list(model.local_layer_indices), "logits": _run_model(model, tokens)}


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny_model(request, tmp_path_factory):
    """(dir, single-process logits, tokens, config) of a tiny random Llama (4 layers untied, 3 tied)."""
    from transformers import LlamaForCausalLM as HFLlama
    tied = request.param == "tied"
    cfg = _config(num_layers=3 if tied else 4, tied=tied)
    torch.manual_seed(0)
    hf = HFLlama(cfg).eval()
    out = tmp_path_factory.mktemp(f"pp_{request.param}")
    hf.save_pretrained(out, safe_serialization=True)
    tokens = torch.randint(0, cfg.vocab_size, (PROMPT_LEN + 1,))
    resolved = ResolvedModel(source=str(out), kind="hf_dir", alias=None)
    model = LlamaForCausalLM(load_hf_config(resolved)).eval()
    model.load_weights(iterate_weights(resolved, model.config, torch.float32))
    ref = _run_model(model, tokens)
    with torch.no_grad():
        hf_logits = hf(tokens[None]).logits[0]
    assert (ref - hf_logits).abs().max() < 1e-4  # the single-process reference itself matches the oracle
    return str(out), ref, tokens, cfg


def _assert_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("partition", [None, "explicit"])
def test_pp2_matches_single_process(tiny_model, partition):
    path, ref, tokens, cfg = tiny_model
    n = cfg.num_hidden_layers
    partition = [1, n - 1] if partition == "explicit" else None
    first, last = run_ranks(_stage_main, tp_size=1, pp_size=2, args=(path, partition, tokens),
                            timeout_s=TIMEOUT_S)
    split = partition[0] if partition else -(-n // 2)
    assert first["layers"] == list(range(split)) and last["layers"] == list(range(split, n))
    assert first["logits"] is None
    _assert_logits(last["logits"], ref)
    for stage, other in ((first, last), (last, first)):
        for name in stage["read"]:  # never a tensor of the other stage's layers
            assert not name.startswith(tuple(f"model.layers.{i}." for i in other["layers"])), name
    assert "lm_head.weight" not in first["read"] and "model.norm.weight" not in first["read"]
    assert ("model.embed_tokens.weight" in last["read"]) == cfg.tie_word_embeddings
    assert set(first["read"]) | set(last["read"]) == set(_hf_names(cfg))


@pytest.mark.slow
def test_tp2_pp2_matches_single_process(tiny_model):
    path, ref, tokens, cfg = tiny_model
    results = run_ranks(_stage_main, tp_size=2, pp_size=2, args=(path, None, tokens), timeout_s=TIMEOUT_S)
    for rank, res in enumerate(results):  # rank = pp_rank * 2 + tp_rank
        if rank < 2:
            assert res["logits"] is None
        else:
            _assert_logits(res["logits"], ref)
