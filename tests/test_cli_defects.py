"""Regression tests for the CLI / recipe / trainer defects of issue 12 that need no training run (in-process,
seconds). The ones that need a trained run (eval, merge-lora, reruns) are in tests/test_documented_commands.py,
which shares one small quick-start run with the documented commands.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from seqpar.cli import main
from seqpar.train.recipe import RecipeError, load_recipe, recipe_from_dict
from tests.test_recipe import QUICK, ROOT


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("seqpar"), err
    return lines[0]


# -- argument parsing: overrides and flags in any order ------------------------------------------------------


def test_overrides_after_flags_are_overrides(capsys):
    rc = main(["train", str(ROOT / "recipes/longlora-llama2-7b-32k.yaml"), "--dry-run", "--world-size", "16",
               "attention.sp_size=4"])
    out = capsys.readouterr().out
    assert rc == 0 and "sp_size 4 x dp_size 4" in out
    assert "world 16 = 2 node(s) x 8" in out  # was "1 node(s) x 8" (launch.nnodes, not the planned world)
    rc = main(["train", str(QUICK), "--dry-run", "--resume", "trainer.max_steps=60", "attention.sp_size=1"])
    assert rc == 0 and "60 steps" in capsys.readouterr().out


def test_unknown_flag_is_still_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(QUICK), "--dry-run", "--bogus", "trainer.max_steps=1"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# -- YAML coercion: only float-typed fields ------------------------------------------------------------------


def test_quoted_number_strings_stay_strings_outside_float_fields():
    base = load_recipe(QUICK).to_dict()
    base["logging"]["name"] = "2024"
    base["lora"]["targets"] = ["1", "q_proj"]
    base["trainer"]["lr"] = "1e-4"  # YAML 1.1 reads 1e-4 as a string: a float field takes it as a number
    base["model"] = {"path": "1e3", "config": {"model_type": "llama"}}
    r = recipe_from_dict(base, ["trainer.weight_decay=1e-2", "logging.project=7e1"])
    assert (r.logging.name, r.model.path, r.lora.targets) == ("2024", "1e3", ["1", "q_proj"])
    assert r.trainer.lr == 1e-4 and r.trainer.weight_decay == 0.01 and r.logging.project == "7e1"
    with pytest.raises(RecipeError, match=r"trainer.lr='nan'"):
        recipe_from_dict(base, ["trainer.lr=nan"])


# -- length suggestions satisfy every constraint of the attention -------------------------------------------


@pytest.mark.parametrize("overrides", [["attention.name=ring", "attention.sp_size=3"],
                                       ["attention.sp_size=4", "data.seq_len=510"],
                                       ["attention.name=ulysses", "attention.sp_size=4", "data.seq_len=510"]])
def test_suggested_lengths_validate(overrides):
    import re

    from seqpar.train.validate import validate

    r = load_recipe(QUICK, [*overrides, "launch.nproc_per_node=12"])
    with pytest.raises(RecipeError) as exc:
        validate(r, 12)
    found = re.search(r"nearest lengths valid for attention.name=\w+ with sp_size \d+: \[([\d, ]+)\]", str(exc.value))
    assert found, exc.value
    for n in map(int, found.group(1).split(",")):
        validate(load_recipe(QUICK, [*overrides, f"data.seq_len={n}"]), 12)  # every suggestion passes


def test_s2_with_an_impossible_sp_size_suggests_sp_sizes_that_work():
    from seqpar.train.validate import validate

    with pytest.raises(RecipeError) as exc:
        validate(load_recipe(QUICK, ["attention.sp_size=3"]), 3)
    msg = str(exc.value)
    assert "510" not in msg and "513" not in msg  # the old suggestions, which the S2 group check rejects
    assert "attention.sp_size in [1, 2, 4]" in msg
    for sp in (1, 2, 4):
        validate(load_recipe(QUICK, [f"attention.sp_size={sp}"]), sp)


def test_torchrun_worker_prints_once_and_fills_the_error_file(tmp_path, monkeypatch, capsys):
    from seqpar.train.cli import report

    err_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(err_file))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert report(RecipeError("bad\n thing"), 2) == 2
    assert capsys.readouterr().err == ""  # rank 1 is silent: local rank 0 prints the same line
    data = json.loads(err_file.read_text())["message"]  # torchrun's summary shows this instead of its own text
    assert data["message"] == data["extraInfo"]["py_callstack"] == "seqpar: error: bad thing"
    monkeypatch.setenv("LOCAL_RANK", "0")
    report(RecipeError("bad"), 2)
    assert capsys.readouterr().err == "seqpar: error: bad\n"


# -- held-out eval split, disjoint across DP ranks -----------------------------------------------------------


def test_eval_split_is_held_out_and_disjoint_across_dp_ranks():
    from seqpar.train.data import build_dataset, byte_tokenizer, eval_batch, split_eval
    from seqpar.train.validate import validate

    with pytest.raises(RecipeError, match=r"eval.every=2 needs a held-out split"):
        validate(load_recipe(QUICK, ["eval.every=2"]), 2)
    r = load_recipe(QUICK, ["eval.every=2", "eval.batches=2", "data.eval_fraction=0.25", "data.passkey.num_samples=16"])
    tok = byte_tokenizer()
    samples = build_dataset(r, tok)
    train, held = split_eval(samples, r, tok, dp_size=2)
    assert len(held) == 4 and len(train) == 12
    key = lambda s: tuple(s["input_ids"].tolist())  # noqa: E731
    assert not {key(s) for s in held} & {key(s) for s in train}  # never trained on
    seen = [key({"input_ids": eval_batch(held, r, i, dp, 2)["input_ids"][0]}) for i in range(2) for dp in range(2)]
    assert len(set(seen)) == 4  # 2 batches x 2 DP ranks: four different samples
    with pytest.raises(RecipeError, match=r"eval.batches x dp_size"):
        split_eval(samples, r, tok, dp_size=4)  # 2 x 4 > 4 held-out samples: would repeat across ranks


def test_eval_files_are_the_held_out_set(tmp_path):
    from seqpar.train.data import byte_tokenizer, split_eval

    docs = tmp_path / "eval.jsonl"
    docs.write_text("".join(json.dumps({"text": "held out text " * 30}) + "\n" for _ in range(4)))
    r = load_recipe(QUICK, ["data.seq_len=64", f"data.eval_files=[{docs}]", "eval.every=1"])
    train, held = split_eval([{"input_ids": torch.zeros(64)}], r, byte_tokenizer(), dp_size=1)
    assert len(train) == 1 and len(held) >= 2 and all(s["input_ids"].shape == (64,) for s in held)


def test_unpacked_data_without_a_full_length_document_is_one_line(tmp_path):
    from seqpar.train.data import byte_tokenizer, file_dataset

    docs = tmp_path / "short.jsonl"
    docs.write_text("".join(json.dumps({"text": "short"}) + "\n" for _ in range(3)))
    r = load_recipe(QUICK, ["data.source=files", f"data.files=[{docs}]", "data.pack=false", "data.seq_len=64"])
    with pytest.raises(RecipeError, match=r"none of data.files=.* has that many .*set data.pack=true"):
        file_dataset(byte_tokenizer(), r.data)  # was: ZeroDivisionError in batch_at


# -- DeepSpeed: fp32 gradient communication and accumulation where SP sums gradients ------------------------


@pytest.mark.parametrize(("overrides", "comm", "accum"), [
    (["trainer.dtype=bf16"], torch.float32, "fp32"),
    (["trainer.dtype=bf16", "deepspeed.zero_stage=3"], torch.float32, "fp32"),
    (["trainer.dtype=bf16", "attention.sp_size=1"], None, None),  # no SP sum: DeepSpeed's defaults
])
def test_engine_receives_fp32_gradient_reduction(monkeypatch, overrides, comm, accum):
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from seqpar.train.engine import build_engine

    seen = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (seen.update(kw), None, None, None))
    build_engine(torch.nn.Linear(2, 2), load_recipe(QUICK, overrides), torch.device("cpu"))
    parsed = DeepSpeedConfig(seen["config"])  # what the engine reads (engine.communication_data_type etc.)
    assert parsed.communication_data_type == comm and parsed.grad_accum_dtype == accum


# -- srun: LOCAL_RANK is the visible-device index ------------------------------------------------------------


def test_local_rank_for_deepspeed_is_the_visible_device_index(monkeypatch):
    from seqpar.parallel import ParallelState
    from seqpar.train.trainer import export_rank_env

    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    monkeypatch.setattr(os, "environ", clean)  # export_rank_env sets variables: keep them out of later tests
    # srun, 4 tasks per node, one GPU bound per task: SLURM_LOCALID 3, but the only visible device is cuda:0
    export_rank_env(ParallelState(7, 8, 3, 1, torch.device("cuda", 0), "nccl", None, None))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("7", "8", "0")
    del os.environ["LOCAL_RANK"]
    export_rank_env(ParallelState(7, 8, 3, 1, torch.device("cpu"), "gloo", None, None))
    assert os.environ["LOCAL_RANK"] == "3"  # CPU: no device ordinal, the local rank as before


# -- fault hooks: parsed once ---------------------------------------------------------------------------------


def test_fault_hooks_are_parsed_once(monkeypatch):
    from seqpar.train import faults

    h = faults.FaultHooks.from_env({"SEQPAR_FAULT_KILL_AT_STEP": "5@1", "SEQPAR_FAULT_NAN_AT_STEP": "2",
                                    "TORCHELASTIC_RESTART_COUNT": "1", "SEQPAR_FAULT_RANK": "0"})
    assert (h.kill_at_step, h.nan_at_step, h.rank) == (5, None, 0)  # NaN fault armed for attempt 0 only
    with pytest.raises(RecipeError, match="SEQPAR_FAULT_NAN_AT_STEP='x'"):
        faults.FaultHooks.from_env({"SEQPAR_FAULT_NAN_AT_STEP": "x"})
    faults.hooks.cache_clear()
    monkeypatch.setenv("SEQPAR_FAULT_NAN_AT_STEP", "3")
    try:
        assert faults.nan_loss(3)
        monkeypatch.setenv("SEQPAR_FAULT_NAN_AT_STEP", "4")  # the loop does not read the environment again
        assert faults.nan_loss(3) and not faults.nan_loss(4)
    finally:
        faults.hooks.cache_clear()


# -- sink tokens: validator and primitive agree; KV-cache window applied to the keys ----------------------------


def test_sink_token_bound_is_the_primitives():
    from seqpar.attention.checks import check_shift_args, max_sink_tokens
    from seqpar.train.validate import validate

    sf = ["attention.name=sf", "attention.sp_size=2"]  # 512 tokens: a group of 128, 256 per rank
    validate(load_recipe(QUICK, [*sf, "attention.num_sink_tokens=200"]), 2)  # > group: was rejected
    with pytest.raises(RecipeError, match="num_sink_tokens=257: must be in \\[0, 256\\]"):
        validate(load_recipe(QUICK, [*sf, "attention.num_sink_tokens=257"]), 2)
    q = torch.zeros(1, 256, 4, 8)
    k = torch.zeros(1, 256, 2, 8)
    assert max_sink_tokens(256) == 256
    check_shift_args(q, k, k, shift_size=128, num_sink_tokens=256, world=2, caller="sf")  # what the validator takes
    with pytest.raises(ValueError, match="num_sink_tokens=257"):
        check_shift_args(q, k, k, shift_size=128, num_sink_tokens=257, world=2, caller="sf")


def test_kv_cache_decoding_applies_the_window_to_the_keys():
    """Past the window, a cache that keeps every key decodes as the unpatched model (was: refused, and before
    that accepted while attending beyond the window); tests/test_windows.py covers the sliding cache."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    from seqpar.models import attention_calls, patch_model, unpatch_model

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 12))

    def decode() -> torch.Tensor:
        out = model(ids[:, :6], cache=DynamicCache(), use_cache=True)  # keeps every key
        logits = [out.logits]
        for n in range(6, 12):  # 7 to 12 keys: the window of 8 engages from the 9th
            out = model(ids[:, n : n + 1], cache=out.past_key_values, use_cache=True, position_ids=torch.tensor([[n]]))
            logits.append(out.logits)
        return torch.cat(logits, 1)

    with torch.no_grad():
        plain = decode()
        patch_model(model, "ring", None)
        got = decode()
    assert attention_calls(model).get("window", 0) == 4  # keys 9..12 exceed the window
    unpatch_model(model)
    assert (got - plain).abs().max() <= 1e-5 * plain.abs().max()


# -- smaller items -------------------------------------------------------------------------------------------


def test_dry_run_shows_usp_degree_and_missing_data_files(capsys):
    rc = main(["train", str(ROOT / "recipes/usp-llama3-8b-128k.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "USP: Ulysses degree 8" in out and "ring degree 2" in out
    assert "note: data.files" in out and "not on this machine" in out


def test_eval_help_shows_defaults_not_examples(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 512; e.g. 512,1024" in out and "default: 256; e.g. 256,512" in out


def test_known_library_warnings_are_filtered_once_and_others_still_show():
    from seqpar.train.quiet import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries("cpu")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
        warnings.warn("something new", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something new"]
