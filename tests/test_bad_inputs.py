"""Bad input, nothing lost: every bad input to ``seqpar train`` is answered by ONE line ``seqpar: error: ...``
naming the problem and the fix, a non-zero exit code and no traceback, before any process group starts.

Most rows run the real command line in this process (``seqpar.cli.main``) with the trainer replaced by a
tripwire, so a bad input that slips through validation fails the test instead of starting a run. The few
that need real processes (a rendezvous nobody joins, a NaN loss, the same error on every rank) run as
plain subprocesses with a timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqpar.launcher import free_port
from seqpar.train import checkpoint as ckpt
from seqpar.train.recipe import RecipeError, load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart-cpu.yaml"
MODEL = ["model.from_config=null", "model.path={tmp}/{model}"]
FILES = ["data.source=files", "data.files=[{tmp}/{file}]"]
RESUME = ["trainer.output_dir={tmp}/{ckpt}"]

# (id, overrides, world size, extra CLI flags, substrings of the one-line error: what is wrong + the fix)
BAD = [
    ("unknown section", ["trainr.max_steps=3"], 2, [], ["trainr: unknown key", "did you mean trainer?"]),
    ("misspelled key", ["trainer.max_step=3"], 2, [], ["trainer.max_step:", "did you mean trainer.max_steps?"]),
    ("other tool's key", ["trainer.learning_rate=0.1"], 2, [], ["did you mean trainer.lr?"]),
    ("lora alias", ["lora.rank=4"], 2, [], ["lora.rank:", "did you mean lora.r?"]),
    ("text for int", ["trainer.max_steps=ten"], 2, [], ["trainer.max_steps='ten'", "expected an integer"]),
    ("float for int", ["attention.sp_size=1.5"], 2, [], ["attention.sp_size=1.5", "an integer"]),
    ("text for bool", ["lora.enabled=maybe"], 2, [], ["lora.enabled='maybe'", "true/false"]),
    ("value for section", ["trainer=5"], 2, [], ["trainer:", "expected a mapping", "got 5"]),
    ("unknown attention", ["attention.name=flash"], 2, [], ["attention.name='flash'", "'ring'", "'ulysses'"]),
    ("zero stage 4", ["deepspeed.zero_stage=4"], 2, [], ["deepspeed.zero_stage=4", "0, 1, 2, 3"]),
    ("negative lr", ["trainer.lr=-1"], 2, [], ["trainer.lr=-1.0", "must be > 0"]),
    ("unknown signal", ["checkpoint.on_signal=[SIGUSR1,SIGFOO]"], 2, [], ["checkpoint.on_signal[1]='SIGFOO'",
                                                                          "SIGTERM, SIGUSR1"]),
    ("nan lr", ["trainer.lr=.nan"], 2, [], ["trainer.lr=nan", "must be > 0"]),
    ("override without =", ["trainer.max_steps"], 2, [], ["'trainer.max_steps'", "dotted.key=value"]),
    ("rope factor < 1", ["rope_scaling.factor=0.5"], 2, [], ["rope_scaling.factor=0.5", ">= 1"]),
    ("missing model folder", ["model.from_config=null", "model.path={tmp}/nowhere"], 2, [],
     ["model.path=", "nowhere", "does not exist", "model folder"]),
    ("model folder without weights", MODEL, 2, [], ["no weights", "*.safetensors", "save_pretrained"]),
    ("tokenizer/model vocab mismatch", MODEL, 2, [], ["tokenizer", "259 tokens", "vocab_size=200",
                                                       "resize_token_embeddings"]),
    ("lora targets not in model", ["lora.targets=[q_proj,query_key_value]"], 2, [],
     ["lora.targets", "['query_key_value'] not in the model", "'q_proj'"]),
    ("seq_len vs ring layout", ["attention.name=ring", "data.seq_len=510"], 2, [],
     ["data.seq_len=510", "multiple of 4", "[508, 512]"]),
    ("sp_size vs world", [], 3, [], ["attention.sp_size=2 does not divide the world size 3", "[1, 3]"]),
    ("heads vs ulysses", ["attention.name=ulysses", "attention.sp_size=3", "data.seq_len=516"], 3, [],
     ["4 heads", "num_attention_heads", "attention.name=ring"]),
    ("s2 group size", ["attention.group_size_ratio=0.3"], 2, [], ["group_size_ratio=0.3", "0.25"]),
    ("missing data file", FILES, 2, [], ["data.files[0]=", "missing.jsonl", "does not exist"]),
    ("empty data file", FILES, 2, [], ["data.files[0]=", "empty.jsonl", "is empty"]),
    ("non-UTF-8 data file", FILES, 2, [], ["data.files[0]=", "latin1.txt", "not UTF-8", "byte 9", "iconv"]),
    ("truncated checkpoint", RESUME, 2, ["--resume"], ["step-00000003", "truncated", "checkpoint.resume=never"]),
    ("corrupt checkpoint", RESUME, 2, ["--resume"], ["step-00000003", "corrupt", "checkpoint.resume=never"]),
    ("checkpoint without state", RESUME, 2, ["--resume"], ["step-00000003", "trainer_state.json"]),
    ("checkpoint of another model", RESUME, 2, ["--resume"],
     ["step-00000003", "different model", "hidden_size", "trainer.output_dir"]),
    ("checkpoint of another world size", RESUME, 2, ["--resume"],
     ["step-00000003", "world size 4", "this run has 2", "launch 4 processes"]),
    ("cuda without a GPU", ["launch.device=cuda"], 2, [], ["launch.device='cuda'", "no CUDA GPU", "launch.device=cpu"]),
]
# Which file/folder a row's placeholders point at.
PLACES = {"model folder without weights": {"model": "noweights"},
          "tokenizer/model vocab mismatch": {"model": "smallvocab"},
          "missing data file": {"file": "missing.jsonl"}, "empty data file": {"file": "empty.jsonl"},
          "non-UTF-8 data file": {"file": "latin1.txt"}}


def tiny_model(folder: Path, *, vocab: int = 260, weights: bool = True) -> Path:
    """A 1-layer Llama folder (safetensors) with the byte tokenizer, as a user would download one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.train.data import byte_tokenizer

    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if weights:
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    else:
        config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def fake_checkpoint(output_dir: Path, *, world: int = 2, step: int = 3, recipe_overrides: tuple = ()) -> Path:
    """A checkpoint folder laid out as ``save_checkpoint`` writes it (state files are small torch.save files)."""
    recipe = load_recipe(QUICK, [f"trainer.output_dir={output_dir}", *recipe_overrides])
    folder = ckpt.checkpoint_root(recipe) / f"step-{step:08d}"
    (folder / "deepspeed" / "state").mkdir(parents=True)
    (folder / "rng").mkdir()
    torch.save({"module": {"w": torch.ones(8)}, "global_steps": step},
               folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt")
    (folder / "deepspeed" / "latest").write_text("state")
    for r in range(world):
        torch.save({"torch": torch.get_rng_state()}, folder / "rng" / f"rank{r}.pt")
    save_recipe(recipe, folder / "recipe.yaml")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "data_position": step,
                                                          "world_size": world, "base_model": "unused"}))
    ckpt.write_manifest(folder)
    (folder / ckpt.MARKER).write_text("ok\n")
    return folder


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    tiny_model(tmp / "noweights", weights=False)
    tiny_model(tmp / "smallvocab", vocab=200)
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "latin1.txt").write_bytes("hello caf\xe9 world\n".encode("latin-1"))
    state = Path("deepspeed") / "state" / "mp_rank_00_model_states.pt"
    f = fake_checkpoint(tmp / "truncated checkpoint") / state
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    f = fake_checkpoint(tmp / "corrupt checkpoint") / state
    f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256) + b"x" * (f.stat().st_size % 256))
    (fake_checkpoint(tmp / "checkpoint without state") / "trainer_state.json").unlink()
    fake_checkpoint(tmp / "checkpoint of another model", recipe_overrides=("model.from_config.hidden_size=32",))
    fake_checkpoint(tmp / "checkpoint of another world size", world=4)
    return tmp


def one_error_line(text: str) -> str:
    """The single ``seqpar: error:`` line of a process's stderr; no traceback anywhere."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("seqpar: error: ")]
    assert len(lines) == 1, f"expected one `seqpar: error:` line, got {len(lines)}:\n{text[-3000:]}"
    return lines[0]


@pytest.mark.parametrize(("name", "overrides", "world", "flags", "needles"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_with_the_fix(name, overrides, world, flags, needles, places, monkeypatch, capsys):
    import seqpar.train.trainer as trainer
    from seqpar.cli import main

    if name == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible: launch.device=cuda is valid here")

    def tripwire(*args, **kwargs):
        raise AssertionError(f"{name}: validation let the bad input through to training")

    monkeypatch.setattr(trainer, "train", tripwire)
    for var in ("RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))  # the world a launcher would have started
    fill = {"tmp": places, "model": "", "file": "", "ckpt": name, **PLACES.get(name, {})}
    args = ["train", str(QUICK), *[o.format(**fill) for o in overrides], *flags]
    assert main(args) == 2, name
    err = capsys.readouterr().err
    line = one_error_line(err)
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"


def test_missing_recipe_and_broken_yaml(tmp_path, capsys):
    from seqpar.cli import main

    assert main(["train", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nope.yaml" in line and "does not exist" in line and "recipes/quickstart-cpu.yaml" in line
    bad = tmp_path / "broken.yaml"
    bad.write_text("trainer:\n  max_steps: [3\n  lr: 1\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "broken.yaml" in line and "not valid YAML" in line and "line" in line
    bad.write_bytes(b"trainer:\n  output_dir: caf\xe9\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)


def test_document_longer_than_sequence_without_packing(tmp_path):
    """Packing off used to truncate long documents silently: now it names the document and the fixes."""
    from seqpar.train.data import build_dataset, byte_tokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": "x" * 600}) + "\n")
    recipe = load_recipe(QUICK, ["data.source=files", f"data.files=[{docs}]", "data.pack=false"])
    with pytest.raises(RecipeError) as err:
        build_dataset(recipe, byte_tokenizer())
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("document 1", "601 tokens", "data.seq_len=512", "data.pack=true"):
        assert needle in msg, msg


# ----------------------------------------------------------------------------------------------------------
# Real processes: a rendezvous nobody joins, the same error on every rank, a NaN loss


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in extra:
            env.pop(var, None)
    return env


def _ranks(world: int, overrides: list[str], cwd: Path, timeout: float, *, start: int | None = None,
           **extra: str) -> list:
    """``start`` (default ``world``) of ``world`` plain ``seqpar train`` processes wired like torchrun's workers;
    (returncode, stderr) of each."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "seqpar", "train", str(QUICK), f"trainer.output_dir={cwd / 'run'}", *overrides]
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra))
             for r in range(world if start is None else start)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{cmd} hung for {timeout}s")
        out.append((p.returncode, err))
    return out


def test_rendezvous_timeout_names_the_address(tmp_path):
    (code, err), = _ranks(2, ["launch.rendezvous_timeout=3"], tmp_path, 90, start=1)
    line = one_error_line(err)
    assert code == 1
    for needle in ("rank 0 of 2", "127.0.0.1:", "within 3s", "MASTER_ADDR"):
        assert needle in line, line


def test_every_rank_reports_a_bad_layout(tmp_path):
    results = _ranks(2, ["attention.sp_size=4", "data.seq_len=512"], tmp_path, 90)
    for code, err in results:
        assert code == 2
        assert "attention.sp_size=4 does not divide the world size 2" in one_error_line(err)


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    results = _ranks(2, ["trainer.max_steps=3", "checkpoint.every=1", "data.passkey.num_samples=8",
                         "logging.wandb=false"], tmp_path, 240, SEQPAR_FAULT_NAN_AT_STEP="2")
    for code, err in results:
        line = one_error_line(err)
        assert code == 1, err[-2000:]
        for needle in ("loss is nan at step 2", "step-00000001", "trainer.lr"):
            assert needle in line, line
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # nothing saved after the bad step
    assert ckpt.latest_checkpoint(root) == root / "step-00000001"
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the NaN step is not logged as a result
