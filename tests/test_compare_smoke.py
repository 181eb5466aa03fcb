"""Pure parts of benchmarks/compare.py: ratios, skipped peers, RESULTS.md rendering (no workloads run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def _results(compare, llama=None):
    ok = {"status": "ok"}
    llama = llama or dict(ok, output_throughput=100.0, p99_ttft_ms=1000.0, median_ttft_ms=500.0,
                          median_tpot_ms=20.0, p99_itl_ms=30.0, settings="--parallel 4")
    return {"machine": {"description": "Test CPU (2 CPUs)"}, "commit": "abc1234", "date": "2026-01-01",
            "smoke": True,
            "roofline": {"bw_bytes_per_s": 10e9, "flops_per_s": 100e9, "m": 4},
            "workload": {"repeats": 3, "offline": {"num_prompts": 8, "min_input_len": 16, "max_input_len": 32,
                                                   "output_len": 8},
                         "serve": {"num_prompts": 8, "input_len": 16, "output_len": 8, "concurrency": 4}},
            "offline": {"flotilla": dict(ok, output_tokens_per_s=400.0, total_tokens_per_s=800.0, mfu=0.25),
                        "hf-single": dict(ok, output_tokens_per_s=20.0, total_tokens_per_s=40.0,
                                          note="2 of 8 requests run; rate extrapolated"),
                        "hf-batch": compare.skipped("hf-batch", "offline", "transformers missing")},
            "serve": {"flotilla-serve": dict(ok, output_throughput=150.0, p99_ttft_ms=1200.0, median_ttft_ms=600.0,
                                             median_tpot_ms=25.0, p99_itl_ms=40.0, mbu=0.1, failed=0),
                      "llama-server": llama}}


def test_ratio_handles_missing():
    compare = _load("compare")
    assert compare.ratio(10, 4) == 2.5
    assert compare.ratio(None, 4) is None
    assert compare.ratio(1, 0) is None
    assert compare.ratio(1, None) is None


def test_compute_ratios(compare):
    r = compare.compute_ratios(_results(compare))
    assert r["offline_flotilla_vs_hf_single"] == pytest.approx(20.0)
    assert r["offline_flotilla_vs_hf_best_batch"] is None  # skipped peer: no ratio, never a number
    assert r["serve_output_throughput_flotilla_vs_llama"] == pytest.approx(1.5)
    assert r["serve_p99_ttft_flotilla_over_llama"] == pytest.approx(1.2)
    assert r["serve_median_tpot_flotilla_over_llama"] == pytest.approx(1.25)


def test_skipped_peer_reported(compare):
    res = _results(compare, llama=compare.skipped("llama-server", "serve", "build failed (no compiler)"))
    res["ratios"] = compare.compute_ratios(res)
    assert res["ratios"]["serve_output_throughput_flotilla_vs_llama"] is None
    section = compare.render_section(res)
    assert "skipped: build failed (no compiler)" in section
    assert "skipped: transformers missing" in section
    assert "n/a (a side is skipped" in section
    assert "| llama-server | |" in section


def test_render_and_update_results_md(compare, tmp_path):
    res = _results(compare)
    res["ratios"] = compare.compute_ratios(res)
    section = compare.render_section(res)
    assert section.startswith(compare.MD_BEGIN) and section.rstrip().endswith(compare.MD_END)
    assert "abc1234" in section and "Test CPU" in section
    assert "BW 10.00 GB/s" in section and "F 100.0 GFLOP/s" in section
    assert "20.00x" in section and "1.50x" in section
    assert "Smoke configuration" in section

    md = tmp_path / "RESULTS.md"
    original = "# Measured results\n\nEarlier sections stay as they are.\n"  # a file without a section yet
    md.write_text(original)
    compare.update_results_md(md, section)
    once = md.read_text()
    assert once.startswith(original.rstrip("\n")) and once.count(compare.MD_BEGIN) == 1
    # a second run replaces the section instead of appending another one
    res["commit"] = "def5678"
    compare.update_results_md(md, compare.render_section(res))
    twice = md.read_text()
    assert twice.count(compare.MD_BEGIN) == 1 and "def5678" in twice and "abc1234" not in twice
    # text after the section survives a replacement
    md.write_text(twice + "\n## Later section\n")
    compare.update_results_md(md, section)
    assert "## Later section" in md.read_text() and md.read_text().count(compare.MD_END) == 1
    # another model's run gets its own section and leaves the default model's alone
    other = dict(res, model="qwen2.5-coder-1.5b-instruct", commit="0ther00")
    compare.update_results_md(md, compare.render_section(other), other["model"])
    text = md.read_text()
    begin, end = compare.markers(other["model"])
    assert text.count(begin) == 1 and text.count(end) == 1 and text.count(compare.MD_BEGIN) == 1
    assert "0ther00" in text.split(begin, 1)[1] and "0ther00" not in text.split(compare.MD_BEGIN, 1)[1].split(compare.MD_END)[0]
    assert "Engine comparison, qwen2.5-coder-1.5b-instruct (issue 18)" in text


def test_workload_and_spread(compare):
    work = compare.random_workload(50, 10, 20, 5, seed=1)
    assert len(work) == 50 and all(10 <= len(p) <= 20 and n == 5 for p, n in work)
    assert all(compare.LOW_ID <= t < compare.VOCAB - compare.LOW_ID for p, _ in work for t in p)
    assert work == compare.random_workload(50, 10, 20, 5, seed=1)
    sub = compare.spread(work, 5)
    assert len(sub) == 5 and sub[0] is work[0] and sub[-1] is work[-1]
    assert compare.spread(work[:3], 5) == work[:3]


def test_llama_server_lookup_without_build(tmp_path, monkeypatch):
    ls = _load("llama_server")
    monkeypatch.delenv("FLOTILLA_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    path, reason = ls.ensure_llama_server(build=False, cache_dir=tmp_path / "cache")
    assert path is None and "not found" in reason
    binary = tmp_path / "cache" / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert ls.ensure_llama_server(build=False, cache_dir=tmp_path / "cache") == (str(binary), "")


def test_serve_profile_interpolates_matmul_times():
    prof = _load("serve_profile")
    table = {1: 1.0, 4: 2.0, 8: 6.0}
    assert prof.interpolate(table, 4) == 2.0
    assert prof.interpolate(table, 6) == 4.0  # between the points
    assert prof.interpolate(table, 16) == 12.0  # proportional beyond the last


def test_serve_profile_accounts_every_step_of_a_real_engine(tiny_llama):
    """The profile on a tiny random Llama: every prompt token is counted in a prefill step, every later token
    in a decode step, and the linear layers' predicted time is a part of the model steps' time."""
    from flotilla import LLM
    prof = _load("serve_profile")
    llm = LLM(model=tiny_llama[0], max_num_seqs=4, max_model_len=64, enable_prefix_caching=False)
    try:
        report = prof.profile(llm, num_prompts=6, input_len=24, output_len=6)
    finally:
        llm.engine.shutdown()
    classes = report["classes"]
    assert sum(c["prefill_tokens"] for c in classes.values()) == 6 * 24
    assert sum(c["decode_tokens"] for c in classes.values()) == 6 * 5  # the first token comes with the prefill
    assert classes["decode"]["steps"] >= 5 and report["workload"]["concurrency"] == 4
    assert 0 < report["model_steps_s"] <= report["wall_s"]
    for c in classes.values():
        assert 0 < c["linear_seconds_predicted"] and c["achieved_gflops"] > 0
    assert report["linear_gflop_per_token"] > 0 and report["best_matmul_gflops"] > 0
