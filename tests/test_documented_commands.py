"""Every shell command shown in README.md and docs/*.md works as written (issue 12).

The test walks the ```bash blocks of README.md and docs/*.md. Each command is, in ``PLAN`` below, either
  - run as written in a workspace laid out like a fresh clone (recipes/, launch/, docs/ copied), with small
    overrides for time appended (said per command: e.g. the quick start runs 2 steps instead of 40, and
    eval 1 passkey trial), in the documented order (train, resume, merge, eval); the ``seqpar ... --dry-run``
    lines each run in a process forked from one that imported seqpar's CLI once (tests/forked_commands.py); or
  - not run, because the doc marks it as needing a GPU or a cluster (the line's comment, or the block's comment line
    above it, says GPU / SLURM / cluster), as long-running (hours, marked so), or because it is this suite or the
    install that runs it. Those are still checked: the seqpar part parses and a recipe in it dry-runs.
A documented command missing from PLAN, a PLAN entry no longer documented, an unmarked GPU/cluster command, or
a command that fails as written fails the suite.

The same small quick-start run (module fixture, ~1 min on 2 cores) then serves the eval / merge-lora / rerun
regression tests of issue 12 below: eval from the run, a checkpoint, its adapter/ and the merged folder gives
the same logits (with the run's RoPE scaling), a rerun refuses without touching anything, merge-lora onto a file
is one line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from seqpar.launcher import free_port
from tests.test_recipe import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FAST = "data.passkey.num_samples=8 logging.wandb=false"  # appended to the quick-start trainings
# command as written -> ("run", extra args appended) | ("gpu" | "cluster" | "long" | "suite" | "setup", why)
PLAN: dict[str, tuple[str, str]] = {
    "make quickstart": ("setup", "creates .venv, pip-installs; its training command runs below (Makefile checked)"),
    "make test": ("suite", "this test suite"),
    "pip install -e '.[dev]' -c launch/constraints-cpu.txt": ("setup", "the install this suite runs from"),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/quickstart-cpu.yaml":
        ("run", f"trainer.max_steps=2 {FAST}"),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/quickstart-cpu.yaml trainer.max_steps=60 --resume":
        ("run", f"trainer.max_steps=3 {FAST}"),
    "seqpar merge-lora runs/quickstart-cpu runs/quickstart-cpu/merged": ("run", ""),
    "seqpar eval runs/quickstart-cpu/merged --passkey --lengths 256,512": ("run", "--trials 1"),
    'seqpar generate runs/quickstart-cpu/merged --prompt "What is the pass key?"': ("run", "--max-new-tokens 16"),
    'seqpar generate runs/quickstart-cpu/merged --prompt "What is the pass key?" --cache h2o --heavy 32 --recent 32':
        ("run", "--max-new-tokens 16"),
    "seqpar eval runs/quickstart-cpu/merged --passkey --lengths 512 --cache h2o --heavy 32 --recent 32":
        ("run", "--trials 1"),
    "seqpar eval runs/quickstart-cpu/merged --ppl README.md --context 512 --passkey --lengths 512 --trials 10 "
    "--cache h2o --heavy 32 --recent 32": ("long", "the generation table's full run: token-by-token perplexity"),
    "seqpar train recipes/ring-llama3-8b-128k.yaml --dry-run": ("run", ""),
    "seqpar train recipes/hybrid-qwen3next-cpu.yaml --dry-run": ("run", ""),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/hybrid-qwen3next-cpu.yaml":
        ("run", "trainer.max_steps=2 data.passkey.num_samples=8"),
    "seqpar train recipes/hybrid-qwen3next-80b-256k.yaml --dry-run --device-memory 80GiB": ("run", ""),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/hybrid-bamba-cpu.yaml":
        ("run", "trainer.max_steps=2 data.passkey.num_samples=8"),
    "seqpar train recipes/hybrid-kimi-linear-48b-128k.yaml --dry-run": ("run", ""),
    "torchrun --nproc_per_node 2 docs/examples/own_loop.py": ("run", ""),
    "torchrun --nproc_per_node 2 docs/examples/hf_trainer.py": ("run", ""),
    "torchrun --nproc_per_node 4 -m seqpar train recipes/fsdp2-cpu.yaml":
        ("suite", "tests/test_fsdp2.py trains this recipe under torchrun on 4 ranks (and through a crash)"),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/fsdp2-cpu.yaml trainer.grad_accum=2 trainer.max_steps=30 "
    "--resume": ("suite", "tests/test_fsdp2.py resumes the 4-rank run's checkpoint on 2 ranks with grad_accum=2"),
    "seqpar train recipes/hybrid-bamba-9b-128k.yaml --dry-run": ("run", ""),
    "sbatch --nodes 4 slurm/train.sbatch recipes/hybrid-qwen3next-80b-256k.yaml": ("cluster", "SLURM"),
    "seqpar train recipes/usp-llama3-8b-128k.yaml --dry-run": ("run", ""),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/window-gptoss-cpu.yaml":
        ("run", "trainer.max_steps=2 data.passkey.num_samples=8"),
    "seqpar train recipes/window-gptoss-20b-128k.yaml --dry-run": ("run", ""),
    "seqpar train recipes/window-gemma3-12b-128k.yaml --dry-run": ("run", ""),
    "torchrun --nproc_per_node 2 -m seqpar train recipes/sft-cpu.yaml":
        ("suite", "tests/test_sft_train.py runs this recipe under torchrun, all 60 steps"),
    "seqpar train recipes/longalpaca-llama2-7b-32k.yaml --dry-run": ("run", ""),
    "seqpar train recipes/sinklora-sft-llama3-8b-32k.yaml --dry-run": ("run", ""),
    "torchrun --nproc_per_node 8 -m seqpar train recipes/longalpaca-llama2-7b-32k.yaml": ("gpu", "8 GPUs"),
    "sbatch --nodes 2 slurm/train.sbatch recipes/window-gptoss-20b-128k.yaml": ("cluster", "SLURM"),
    "torchrun --nproc_per_node 8 -m seqpar train recipes/window-gemma3-12b-128k.yaml": ("gpu", "8 GPUs"),
    "seqpar bench softmax --methods ring_zigzag,ring_contiguous,ring_window_L8,ring_window4096,"
    "ring_contiguous_window4096 --min-len 8192 --repeats 1 --out docs/bench/windows":
        ("long", "the full run of the window rows"),
    "seqpar train recipes/ring-llama3-8b-128k.yaml --dry-run --device-memory 80GiB": ("run", ""),
    "seqpar train recipes/ring-llama3-8b-128k.yaml --dry-run --simulate":
        ("long", "one simulated step of Llama-3-8B at 128k on fake CUDA, about a minute on 2 cores"),
    "seqpar train recipes/ring-llama3-8b-128k.yaml deepspeed.offload=cpu --dry-run --simulate --device-memory 80GB":
        ("long", "the simulated length search: 4 fake-CUDA steps, minutes on 2 cores"),
    "seqpar bench fidelity --quick": ("suite", "tests/test_fidelity.py runs the same --quick pipeline"),
    "seqpar bench fidelity --seeds 3 --out runs/fidelity": ("long", "the full fidelity run, ~12 min on 2 idle cores"),
    "seqpar bench fidelity --markdown docs/fidelity.md --out runs/fidelity": ("long", "needs the full run's results"),
    "sbatch --nodes 2 --time 24:00:00 slurm/train.sbatch recipes/usp-llama3-8b-128k.yaml": ("cluster", "SLURM"),
    "seqpar train recipes/longlora-llama2-7b-32k.yaml --dry-run --world-size 16 attention.sp_size=4": ("run", ""),
    "seqpar bench softmax --out bench-results":
        ("run", "--quick --repeats 1 --warmup 0 --methods ring_zigzag --worlds 2"),
    "seqpar bench --markdown docs/benchmarks.md --out docs/bench": ("run", ""),  # on the workspace's copy of docs/
    "accelerate launch --config_file launch/accelerate/cpu-deepspeed.yaml -m seqpar train recipes/quickstart-cpu.yaml":
        ("run", "--dry-run"),  # the launch path on 2 CPU processes; the quick start above trains the same recipe
    "launch/torchrun.sh recipes/longlora-llama2-7b-32k.yaml": ("gpu", "a 7B model on one node of GPUs"),
    "launch/torchrun.sh recipes/longlora-llama2-7b-32k.yaml [key=value ...] [--resume]": ("gpu", "template"),
    "torchrun --nproc_per_node 8 -m seqpar train recipes/longlora-llama2-7b-32k.yaml": ("gpu", "8 GPUs"),
    "accelerate launch --config_file launch/accelerate/deepspeed-zero2.yaml -m seqpar train "
    "recipes/longlora-llama2-7b-32k.yaml": ("gpu", "8 GPUs"),
    "seqpar merge-lora runs/longlora-llama2-7b-32k OUT_DIR": ("gpu", "the GPU run's output"),
    "sbatch --nodes 2 slurm/train.sbatch recipes/usp-llama3-8b-128k.yaml": ("cluster", "SLURM"),
    "SEQPAR_LAUNCH=srun sbatch --nodes 2 --ntasks-per-node 8 slurm/train.sbatch recipes/usp-llama3-8b-128k.yaml":
        ("cluster", "SLURM"),
    "seqpar bench --out docs/bench": ("long", "hours on 2 cores; the same suites run at small sizes in test_bench"),
    'B="seqpar bench --out docs/bench"': ("long", "the full benchmark run below"),
    "$B softmax --worlds 2 --append && $B longlora --append && $B linear --max-len 32768 --append":
        ("long", "full run"),
    "$B softmax --worlds 4 --max-len 8192 --append && $B e2e --max-len 8192 --append": ("long", "full run"),
    "$B scaling --methods llama3_hf,llama3_seqpar,llama3_seqpar_memory,llama3_alst --repeats 1 --append":
        ("long", "full run"),
    "python scripts/linear_before_after.py --local-len 16384 --repeats 7":
        ("long", "full sizes; reads the old kernel from git history, which a shallow CI clone may lack"),
    "scripts/gpu-check.sh": ("gpu", "one GPU; without CUDA it only reports so (test below)"),
    ".venv/bin/python -m pytest -q tests/test_slurm.py": ("suite", "part of this suite"),
    ".venv/bin/python -m pytest -q tests/test_multinode.py": ("suite", "part of this suite"),
    ".venv/bin/python -m pytest -q tests/test_crash_resume.py tests/test_bad_inputs.py tests/test_safe_loading.py":
        ("suite", "part of this suite"),
}
MARKS = {"gpu": r"gpu", "cluster": r"slurm|cluster|sbatch", "long": r"hours|full (benchmark )?run|full sizes"}


def documented() -> list[tuple[str, str, str]]:
    """(file, command, its comments: the line's and the block's last comment line above) per ```bash command."""
    out = []
    for doc in DOCS:
        block = None
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                block, above = ([] if block is None and line.strip() == "```bash" else None), ""
                continue
            if block is None or not line.strip():
                continue
            code, _, comment = line.partition("#") if not line.lstrip().startswith("#") else ("", "", line)
            if not code.strip():
                above = comment
                continue
            out.append((doc.name, " ".join(code.split()), f"{comment} {above}"))  # a comment covers the lines below
    return out


def test_every_documented_command_is_planned_and_marked():
    found = documented()
    commands = {c for _, c, _ in found}
    assert commands - PLAN.keys() == set(), "documented but not in PLAN: classify (run it, or mark it GPU/cluster)"
    assert PLAN.keys() - commands == set(), "in PLAN but no longer documented"
    for doc, cmd, comments in found:
        kind = PLAN[cmd][0]
        if kind in MARKS:  # not run: the doc itself must say why
            assert re.search(MARKS[kind], comments + cmd, re.I), f"{doc}: {cmd!r} is not marked {kind}-only"
    make = (ROOT / "Makefile").read_text()
    assert "torchrun --nproc_per_node 2 -m seqpar train recipes/quickstart-cpu.yaml" in make  # make quickstart's job


def test_commands_not_run_still_parse():
    """GPU / cluster / long commands: their seqpar arguments parse, and a recipe they name dry-runs."""
    from seqpar.cli import build_parser, main

    for cmd, (kind, _) in PLAN.items():
        if kind not in MARKS:
            continue
        for segment in cmd.replace("$B", "seqpar bench --out docs/bench").split("&&"):
            words = shlex.split(segment.replace("[key=value ...] [--resume]", ""))
            if words and words[0] == "seqpar" and words[1] in ("bench", "eval", "merge-lora"):
                build_parser().parse_args(words[1:])
        words = shlex.split(cmd.replace("[key=value ...] [--resume]", ""))
        for recipe in [w for w in words if w.startswith("recipes/")]:
            assert main(["train", str(ROOT / recipe), "--dry-run"]) == 0, cmd


pytestmark = pytest.mark.timeout(900)  # the fixture's seven commands: ~2 min on 2 idle cores, more under load


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A fresh-clone layout; the runnable commands run there in documented order. Returns (dir, results)."""
    ws = tmp_path_factory.mktemp("clone")
    for name in ("recipes", "launch", "slurm"):
        os.symlink(ROOT / name, ws / name)
    shutil.copytree(ROOT / "docs", ws / "docs")  # bench --markdown rewrites a page: the copy, not the repo's
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    def run(cmd: str, extra: str) -> subprocess.CompletedProcess:
        # PET_MASTER_PORT: torchrun's default port 29500 may be taken by another job here
        t0 = time.perf_counter()
        proc = subprocess.run(f"{cmd} {extra}", shell=True, cwd=ws, capture_output=True, text=True,
                              env={**env, "PET_MASTER_PORT": str(free_port())}, timeout=300)
        print(f"{time.perf_counter() - t0:6.1f} s wall  {cmd} {extra}")
        return proc

    runs = [(cmd, extra) for cmd, (kind, extra) in PLAN.items() if kind == "run"]
    # Two lanes side by side: the quick start's chain (train, resume, merge, eval, generate: each reads what the
    # one before wrote), in documented order; and every other command (dry-runs, the bench). The other CPU
    # trainings are dealt to the two lanes so that both take about as long. Every command but the chain's reads
    # only recipes and docs and writes its own folder.
    dry = [(cmd, extra) for cmd, extra in runs if "--dry-run" in f"{cmd} {extra}"]
    chain = [(cmd, extra) for cmd, extra in runs if "quickstart-cpu" in cmd and (cmd, extra) not in dry]
    trainings = [(cmd, extra) for cmd, extra in runs if cmd.startswith("torchrun") and (cmd, extra) not in chain]
    rest = [r for r in runs if r not in chain + trainings]
    # The seqpar dry runs (a fraction of a second of work each, after ~5 s of CPU importing torch, transformers
    # and DeepSpeed) run as written through one forking process that imports once (tests/forked_commands.py):
    # each still runs in a process of its own, the console script's main() on the command's own argument list.
    forked = [(cmd, extra) for cmd, extra in rest if (cmd, extra) in dry and cmd.startswith("seqpar ")
              and not set("&|;<>$`") & set(f"{cmd} {extra}")]
    # a recipe's trainings stay together and in order (the FSDP2 resume on 2 ranks reads the 4-rank run); each
    # group goes to the lane with fewer launches so far (each command ~10-25 s; the forked dry runs count once)
    groups: dict[str, list] = {}
    for cmd, extra in trainings:
        groups.setdefault(next((w for w in cmd.split() if w.endswith((".yaml", ".py"))), cmd), []).append((cmd, extra))
    dealt: dict[str, list] = {"chain": [], "rest": []}
    launches = {"chain": len(chain), "rest": len(rest) - len(forked) + bool(forked)}
    for group in groups.values():
        lane = min(launches, key=launches.get)
        dealt[lane] += group
        launches[lane] += len(group)
    chain = chain + dealt["chain"]
    rest = dealt["rest"] + rest

    def run_forked(batch: list[tuple[str, str]]) -> dict[str, subprocess.CompletedProcess]:
        out = ws / ".forked"
        spec = out / "spec.json"
        out.mkdir()
        spec.write_text(json.dumps({"commands": [shlex.split(f"{cmd} {extra}") for cmd, extra in batch],
                                    "out": str(out)}))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tests.forked_commands", str(spec)], cwd=ws, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"tests/forked_commands.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        print(f"{time.perf_counter() - t0:6.1f} s wall  {len(batch)} forked seqpar dry runs:")
        done = {}
        for i, ((cmd, extra), result) in enumerate(zip(batch, json.loads((out / "results.json").read_text()))):
            print(f"{result['seconds']:6.1f} s wall    {cmd} {extra}")
            done[cmd] = subprocess.CompletedProcess(result["argv"], result["returncode"],
                                                    (out / f"{i}.out").read_text(), (out / f"{i}.err").read_text())
        shutil.rmtree(out)
        return done

    def run_lane(lane: list) -> dict[str, subprocess.CompletedProcess]:
        done = {}
        for cmd, extra in lane:
            if (cmd, extra) in forked:
                if cmd not in done:
                    done.update(run_forked(forked))
            else:
                done[cmd] = run(cmd, extra)
        return done

    with ThreadPoolExecutor(2) as pool:
        lanes = [pool.submit(run_lane, lane) for lane in (chain, rest)]
        results = {cmd: proc for lane in lanes for cmd, proc in lane.result().items()}
    return ws, results, env


@pytest.mark.parametrize("cmd", [c for c, (kind, _) in PLAN.items() if kind == "run"])
def test_documented_command_runs(workspace, cmd):
    _, results, _ = workspace
    proc = results[cmd]
    assert proc.returncode == 0, f"{cmd} {PLAN[cmd][1]}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_resume_continued_the_quick_start_and_logged_each_step_once(workspace):
    ws, _, _ = workspace
    steps = [json.loads(x)["step"] for x in (ws / "runs/quickstart-cpu/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# -- issue 12: eval loads exactly the trained model; reruns; merge-lora onto a file ---------------------------


def test_eval_loads_the_trained_model_from_run_checkpoint_adapter_and_merged_folder(workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from seqpar.eval.cli import load_model
    from seqpar.eval.perplexity import check_context
    from seqpar.train.checkpoint import latest_checkpoint

    ws, _, _ = workspace
    run = ws / "runs/quickstart-cpu"
    ckpt = latest_checkpoint(run / "checkpoints")
    ids = torch.randint(3, 259, (1, 512), generator=torch.Generator().manual_seed(0))
    logits, kinds = [], []
    for folder in (run / "merged", run, ckpt, ckpt / "adapter"):
        model, tok, kind = load_model(str(folder), dtype="float32", device="cpu")
        check_context(model, 512, arg="--lengths")  # the context the run trained for (PI x2 on 256 positions)
        assert len(tok) == 259
        with torch.no_grad():
            logits.append(model(ids).logits)
        kinds.append(kind)
    assert kinds == ["model", "checkpoint", "checkpoint", "checkpoint"]
    for other in logits[1:]:
        assert ((other - logits[0]).abs().max() / logits[0].abs().max()).item() <= 1e-5
    # the old path: the adapter on its base without the run's RoPE scaling gives another model
    config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()  # not relative to the training cwd
    plain = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    plain = PeftModel.from_pretrained(plain, ckpt / "adapter").merge_and_unload().eval()
    with torch.no_grad():
        old = plain(ids).logits
    # (a tiny model after 3 steps: the RoPE difference shows at the 1e-3 level; the trained quick start's is 42%)
    assert ((old - logits[0]).abs().max() / logits[0].abs().max()).item() > 1e-3
    merged_cfg = json.loads((run / "merged" / "config.json").read_text())
    assert merged_cfg["max_position_embeddings"] == 512


def test_rerun_into_an_earlier_run_refuses_and_touches_nothing(workspace):
    ws, _, env = workspace
    run = ws / "runs/quickstart-cpu"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if "merged" not in p.parts}
    cmd = [sys.executable, "-m", "seqpar", "train", "recipes/quickstart-cpu.yaml", "trainer.max_steps=2",
           "attention.sp_size=1", *FAST.split()]  # a fresh run (no --resume) into the quick start's folder
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("seqpar")]
    assert len(line) == 1 and "holds an earlier run" in line[0] and "--resume" in line[0]
    assert "trainer.output_dir" in line[0] and "Traceback" not in proc.stderr
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if "merged" not in p.parts}
    assert after == before  # nothing written, nothing removed


def test_merge_lora_onto_an_existing_file_is_one_line(workspace, tmp_path, capsys):
    from seqpar.cli import main

    ws, _, _ = workspace
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert main(["merge-lora", str(ws / "runs/quickstart-cpu"), str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an existing file" in err[0]
    assert target.read_text() == "keep me"


def test_torchrun_script_takes_flags_and_overrides_in_any_order(workspace):
    ws, _, env = workspace
    proc = subprocess.run(["launch/torchrun.sh", "recipes/quickstart-cpu.yaml", "trainer.max_steps=4", "--resume",
                           "--dry-run", "trainer.lr=1e-3", "attention.sp_size=1"], cwd=ws, env={**env, "NPROC": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 steps, lr 0.001" in proc.stdout and "device: cpu" in proc.stdout  # launch.device=cpu came first


def test_gpu_check_script_reports_no_cuda_and_fails_without_a_gpu(tmp_path):
    """scripts/gpu-check.sh (README): on a machine without CUDA it writes its results file, says why, exits 1."""
    out = tmp_path / "gpu-check"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    report = (out / "results.md").read_text()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "# seqpar GPU check" in report and "torch 2" in report
    assert "no CUDA device is visible" in report
