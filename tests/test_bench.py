"""seqpar bench: the wrapped peers compute the right thing, and ``seqpar bench --quick`` runs end to end.

Benchmarks are not tests (DESIGN.md): nothing here asserts a speed. What is asserted: every softmax method
the bench times (seqpar's primitives AND the peers DeepSpeed-Ulysses and PyTorch's templated ring) gives
the output and dq of one-process SDPA on the whole sequence; the Llama training-step methods (seqpar
patched ring / Ulysses and DeepSpeed's HF Ulysses, bare and inside a ZeRO-3 engine) give the one-process
loss; and the CLI's quick run writes a valid results.json (every expected row, no error, targets), the
PNGs and the Markdown section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.bench import training  # noqa: F401  (registers the llama_* methods)
from seqpar.bench.methods import METHODS
from seqpar.bench.suites import SUITES
from seqpar.sharding import unshard
from tests.dist import run_ranks

REPO = Path(__file__).resolve().parents[1]
SOFTMAX_METHODS = ["ring_zigzag", "ring_contiguous", "rsa", "ulysses", "allgather", "deepspeed_ulysses",
                   "torch_ring"]
LLAMA_METHODS = ["llama_ring", "llama_ulysses", "llama_deepspeed_ulysses"]  # DeepSpeed last: it rebinds "sdpa"


def _out_and_dq(step, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's output and dq on the whole sequence ``[B, L, H, D]`` (gathered if sharded)."""
    out = step()
    dq = step.inputs[0].grad
    dq = dq.transpose(1, 2) if step.heads_first else dq
    if step.layout is None:
        return out, dq
    return tuple(unshard(t.contiguous(), group=group, dim=1, layout=step.layout) for t in (out, dq))


def _banded_sdpa(cfg: dict, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-process SDPA with a boolean band mask written here (key k visible from query q iff q - w < k <= q):
    output and dq on the whole sequence, from the inputs every method draws."""
    q, k, v = METHODS["single_sdpa"](cfg, None).inputs
    pos = torch.arange(cfg["seq_len"])
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=band, enable_gqa=True).transpose(1, 2)
    out.backward(torch.ones_like(out))
    return out.detach(), q.grad


def _peer_checks(rank: int, world: int, group) -> dict:
    errors = {}
    for kv_heads in (8, 4):  # MHA, and GQA (the peers repeat K/V heads themselves)
        cfg = {"batch": 1, "seq_len": 64, "heads": 8, "kv_heads": kv_heads, "head_dim": 16, "causal": True}
        ref_out, ref_dq = _out_and_dq(METHODS["single_sdpa"](cfg, None), None)
        for name in SOFTMAX_METHODS:
            out, dq = _out_and_dq(METHODS[name](cfg, group), group)
            errors[(name, kv_heads)] = max((out - ref_out).abs().max().item(), (dq - ref_dq).abs().max().item())
        # Negative control: a non-causal output is far from the causal reference, so the tolerance means something.
        wrong, _ = _out_and_dq(METHODS["single_sdpa"]({**cfg, "causal": False}, None), None)
        errors[("non-causal control", kv_heads)] = -(wrong - ref_out).abs().max().item()
        # Issue 24: the window rows against SDPA with transformers' band mask (q - w < k <= q), w = L/8 = 8
        win_out, win_dq = _banded_sdpa(cfg, cfg["seq_len"] // 8)
        out, dq = _out_and_dq(METHODS["ring_window_L8"](cfg, group), group)
        errors[("ring_window_L8", kv_heads)] = max((out - win_out).abs().max().item(),
                                                   (dq - win_dq).abs().max().item())
        errors[("window control", kv_heads)] = -(win_out - ref_out).abs().max().item()  # the window is engaged
    llama = {"batch": 1, "seq_len": 32, "model": "quickstart"}
    loss = {name: METHODS[name](llama, group)().item() for name in ["llama_single", *LLAMA_METHODS[:2]]}
    # Inside a ZeRO-3 engine (the first step's loss: before the optimizer moves the weights). DeepSpeed's SP
    # groups can be made once per process, so its bare run is checked by the quick run's e2e rows instead.
    for name in ("llama_ring", "llama_deepspeed_ulysses"):
        loss[f"{name} +zero3"] = METHODS[name]({**llama, "engine": "zero3"}, group)().item()
    return {"errors": errors, "loss": loss}


def test_peers_and_model_methods_match_one_process():
    for rank, got in enumerate(run_ranks(_peer_checks, 2)):
        for (name, kv_heads), err in got["errors"].items():
            if name.endswith("control"):
                assert -err > 1e-2, f"rank {rank}: the {name} is within {-err} of the reference"
            else:
                assert err < 1e-5, f"rank {rank}: {name} (kv_heads={kv_heads}) differs from one process by {err}"
        ref = got["loss"].pop("llama_single")
        assert set(got["loss"]) == {*LLAMA_METHODS[:2], "llama_ring +zero3", "llama_deepspeed_ulysses +zero3"}
        for name, loss in got["loss"].items():
            assert loss == pytest.approx(ref, rel=1e-5), f"rank {rank}: {name} loss {loss} != one process {ref}"



def _memory_methods(rank: int, world: int, group) -> dict:
    """The longest-context methods at two lengths in the same processes, as a search rebuilds them (DeepSpeed's
    registration used to wrap the previous length's Ulysses wrapper); ALST last: it rebinds "sdpa"."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    loss = {}
    for name in ("llama3_hf", "llama3_seqpar_memory", "llama3_alst"):
        for L in (256, 512):
            cfg = {"batch": 1, "model": "llama3", "seq_len": L}
            loss[(name, L)] = METHODS[name](cfg, None if name == "llama3_hf" else group)().item()
    engaged = ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward  # DeepSpeed's Ulysses wrapper ran
    return {"loss": loss, "alst_engaged": engaged}


def test_longest_context_methods_give_the_one_process_loss():
    """seqpar with the memory options and DeepSpeed's ALST path (Ulysses over 8:2 GQA heads at N = 2) give
    the loss of plain transformers on one process, so the longest-context comparison is of correct runs."""
    for rank, got in enumerate(run_ranks(_memory_methods, 2)):
        assert got["alst_engaged"], f"rank {rank}: UlyssesSPAttentionHF never replaced transformers' sdpa"
        for (name, L), loss in got["loss"].items():
            ref = got["loss"][("llama3_hf", L)]
            assert loss == pytest.approx(ref, rel=1e-5), f"rank {rank}: {name} at L={L}: {loss} != one process {ref}"
        assert got["loss"][("llama3_hf", 256)] != got["loss"][("llama3_hf", 512)]  # the lengths are different data


def _expected_rows(suite: str) -> set[tuple]:
    return {(c["method"], c["sp"], c.get("seq_len")) for c in SUITES[suite](True)}


def _check_report(report: dict, out: Path) -> None:
    rows = report["results"]
    errors = [r for r in rows if "error" in r]
    assert not errors, f"failed configurations: {[(r['suite'], r['method'], r['error']) for r in errors]}"
    for suite in SUITES:
        got = {(r["method"], r["sp"], r.get("seq_len")) for r in rows if r["suite"] == suite}
        assert got == _expected_rows(suite), f"{suite}: rows {got} != expected {_expected_rows(suite)}"
        if any("median_s" in r or "max_seq_len" in r for r in rows if r["suite"] == suite):
            assert (out / f"{suite}.png").stat().st_size > 1000, f"{suite}.png missing or empty"
    timed = [r for r in rows if "median_s" in r]
    assert all(r["median_s"] > 0 and len(r["ranks"]) == r["world"] for r in timed)
    assert all(r["bytes_sent_per_rank"] > 0 for r in timed if r["sp"] == r["world"] > 1 and r["suite"] != "e2e"
               and r["method"] not in ("deepspeed_ulysses", "torch_ring"))
    # issue 24's window rows carry their ratios to the same call without a window; a halo of w - 1 keys per
    # run sends fewer bytes than the ring's whole shards (bytes are counted, not timed: deterministic)
    windowed = [r for r in timed if "versus" in r]
    assert windowed and all({"versus_time_ratio", "versus_bytes_ratio"} <= set(r) for r in windowed), windowed
    assert all(0 < r["versus_bytes_ratio"] < 1 for r in windowed), [r["versus_bytes_ratio"] for r in windowed]
    e2e = {r["method"]: r["loss"] for r in rows if r["suite"] == "e2e"}
    assert max(e2e.values()) - min(e2e.values()) < 1e-4 * abs(e2e["llama_single"]), f"e2e losses differ: {e2e}"
    qwen = {r["method"]: r["loss"] for r in rows if r["method"].startswith("qwen3next")}  # the whole hybrid step
    assert abs(qwen["qwen3next_lasp2"] - qwen["qwen3next_single"]) < 1e-5 * abs(qwen["qwen3next_single"]), qwen
    for r in (r for r in rows if "search" in r):
        lengths = [p["seq_len"] for p in r["probes"]]
        assert lengths == sorted(lengths) and r["max_seq_len"] in lengths, r
    assert [t["name"] for t in report["targets"]] and all("value" in t or "missing" in t for t in report["targets"])


@pytest.mark.timeout(300)
def test_quick_run_writes_results_plots_and_markdown(tmp_path):
    """The CI smoke run: ``seqpar bench --quick`` over every suite (gpu reports "skipped: no CUDA" on CPU), two
    configurations at a time (``--jobs 2``: smoke figures, not measurements)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "seqpar", "bench", "--quick", "--repeats", "1", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TARGET ring_attention N=2 time vs one process" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    _check_report(report, out)
    if not torch.cuda.is_available():
        assert [r["skipped"] for r in report["results"] if r["suite"] == "gpu"] == ["no CUDA"]
    memory = [r for r in report["results"] if r["suite"] == "memory"]  # issue 28: peaks in units of the local q
    assert {(r["method"], r["sp"]) for r in memory} >= {("single_sdpa", 2), ("ring_zigzag", 2), ("s2", 2)}
    assert all(r["units"] > 0 for r in memory) and "peak memory in units of the local q" in proc.stdout

    from seqpar.bench.markdown import BEGIN, END, update_page

    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(f"# Benchmarks\n\nhand-written text\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    for _ in range(2):  # regenerating replaces the section, it does not append a second one
        update_page(page, out)
    text = page.read_text()
    assert text.count(BEGIN) == 1 and "old" not in text and text.endswith("tail\n")
    assert "hand-written text" in text and "| llama_deepspeed_ulysses |" in text and "../bench/e2e.png" in text


def test_bad_suite_or_method_names_the_choices():
    from seqpar.bench.cli import _configs, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["softmaxx", "--quick", "--repeats", "1", "--warmup", "0"])
    with pytest.raises(SystemExit, match=r"unknown suite\(s\) \['softmaxx'\]; choose from"):
        _configs(args)
    args = parser.parse_args(["softmax", "--quick", "--methods", "ring_zigzag,ringg"])
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['ringg'\] in --methods; choose from .*ring_zigzag"):
        _configs(args)
    args.methods = "ring_zigzag"
    assert {c["method"] for c in _configs(args)} == {"ring_zigzag", "single_sdpa"}  # baselines always kept
    args = parser.parse_args(["softmax", "--worlds", "4", "--max-len", "4096"])
    assert {(c["sp"], c["seq_len"]) for c in _configs(args)} == {(4, 2048), (4, 4096)}


def test_append_replaces_the_rows_it_remeasures(tmp_path, monkeypatch):
    """``--append`` keeps rows of other configurations and replaces those it runs again (no duplicate rows),
    each row stamped with when it was measured; the markdown header gives that span."""
    import seqpar.bench.runner as runner
    from seqpar.bench.cli import add_arguments, run
    from seqpar.bench.markdown import update_page

    calls = []

    def fake_run_config(cfg, timeout):
        calls.append(cfg["method"])
        return {**cfg, "median_s": 0.1 * len(calls), "peak_mem_bytes": 1 << 20, "sent_bytes": 0}

    monkeypatch.setattr(runner, "run_config", fake_run_config)
    monkeypatch.setattr("seqpar.bench.report.plot", lambda results, out: [])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["softmax", "--quick", "--out", str(tmp_path), "--repeats", "1"]
    run(parser.parse_args([*base, "--methods", "ring_zigzag,torch_ring"]))
    first = json.loads((tmp_path / "results.json").read_text())["results"]
    run(parser.parse_args([*base, "--methods", "ring_zigzag", "--append", "--repeats", "3"]))
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    keys = [(r["method"], r["seq_len"], r["sp"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(first) == 3  # baseline, ring, torch_ring: none twice
    new = {r["method"]: r["median_s"] for r in rows}
    old = {r["method"]: r["median_s"] for r in first}
    assert new["torch_ring"] == old["torch_ring"] and new["ring_zigzag"] != old["ring_zigzag"]
    assert all("measured_utc" in r for r in rows)
    page = tmp_path / "page.md"
    update_page(page, tmp_path)
    assert "rows measured 20" in page.read_text()
