"""``seqpar train RECIPE --dry-run --simulate``: one real training step of the recipe's model, as one rank of the
planned world, on fake CUDA (no GPU, no weights, no memory), and that rank's peak of live device bytes next to
the analytic planner's (seqpar.train.planner).

Why: the planner is a formula, right only for what it was written for; a simulated step runs the code a GPU
would (the real model class at its real size, the patched attention primitive over a fake process group of W
ranks, gradient checkpointing and its offload, the tiled MLP, the fused loss) and counts what it allocates.
Under ``torch._subclasses.fake_tensor.FakeTensorMode`` a CUDA tensor has a shape, a dtype and a device but no
storage bytes behind it, so Llama-3-8B at 128k tokens per rank runs in a minute on a laptop. A CPU-only PyTorch
needs the fake-CUDA shim for that (seqpar.fake_cuda): without it this process runs the step in a child started
with ``fake_cuda.environ()``.

What is measured and what is computed:

- measured (a dispatch mode counts every new CUDA storage by its bytes until the storage is freed): the
  activations of one micro-batch's forward (peak up to the loss: kept activations, the loss head's tiles) and
  backward (peak of the backward: recomputed layers, their gradients, communication buffers, the parameter
  gradients the moment autograd makes them);
- computed by the planner's formulas, because DeepSpeed does not run under fake tensors: the state kept across
  steps (parameters, the float32 master partition and Adam's m and v, ZeRO-3's gradient partition) and
  DeepSpeed's buffers (ZeRO-2's gradient bucket, its flattened copy, ZeRO-3's gathered parameters). Each
  parameter's gradient is dropped as soon as autograd has accumulated it, as DeepSpeed moves it into its
  bucket (counted by the formula) and frees it.

The simulated peak is ``max(engine build, state + max(forward + gathered, backward + gathered + bucket,
reduction))``: the planner's composition with the two activation phases measured instead of estimated.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqpar.train.planner import MemoryPlan, gib, plan_memory
from seqpar.train.recipe import Recipe, RecipeError, recipe_from_dict


@dataclass
class Simulated:
    """One simulated step: measured activation peaks (bytes) and the planner's plan at the same length."""

    seq_len: int
    forward: int  # peak of new CUDA bytes from the step's start to the loss
    backward: int  # peak from the loss to the end of the backward
    plan: MemoryPlan

    @property
    def total(self) -> int:
        p, bu = self.plan, self.plan.buffers
        gathered, bucket = bu.get("gathered", 0), bu.get("bucket", 0)
        step = max(self.forward + gathered, self.backward + gathered + bucket, p.phases["reduce"])
        return max(p.setup, p.state + step)

    def lines(self) -> list[str]:
        p = self.plan
        return [f"simulated peak memory per rank: {gib(self.total)} (one step on fake CUDA, {p.tokens_per_rank} "
                f"tokens per rank; planner {gib(p.total)}, {p.total / max(1, self.total):.2f}x of it)",
                f"  measured activations: forward {gib(self.forward)} (planner {gib(_planned_forward(p))}), "
                f"backward {gib(self.backward)} (planner {gib(_planned_backward(p))})",
                f"  by the planner's formulas (DeepSpeed does not run on fake tensors): parameters {gib(p.params)}, "
                f"gradients {gib(p.grads)}, optimizer states {gib(p.optimizer)}, deepspeed buffers "
                + ", ".join(f"{k} {gib(v)}" for k, v in p.buffers.items())]

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "forward": self.forward, "backward": self.backward, "total": self.total,
                "planner": self.plan.total, "tokens_per_rank": self.plan.tokens_per_rank}


def _planned_forward(p: MemoryPlan) -> int:
    a = p.activations
    return a["kept"] + a["comm"] + a["head"]


def _planned_backward(p: MemoryPlan) -> int:
    a = p.activations
    return a["kept"] + a["comm"] + a["working"]


# Temporaries an op allocates inside its kernel, which no dispatch mode sees (only an op's outputs pass through
# it): aten's logsumexp computes ``exp(x - max)`` into a tensor the size of its input before summing it (the
# fused loss's [chunk, V] float32 tile: as large as the tile itself).
WORKSPACE = {"logsumexp": lambda x: x.numel() * x.element_size()}


class DevicePeak:
    """Live bytes of CUDA storages allocated while active, and their peak (``reset`` starts a new window).

    A dispatch mode sees every op's outputs; an output whose storage is new (not an input's: views and in-place
    results share one) is counted once, by ``nbytes``, until a weakref finalizer sees the storage freed. Works
    with fake tensors, whose storages have sizes but no memory."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live = self.peak = 0
        self._seen: set[int] = set()

        def release(key: int, nbytes: int) -> None:
            if key in tracker._seen:
                tracker._seen.discard(key)
                tracker.live -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                out = func(*args, **(kwargs or {}))
                scratch = WORKSPACE.get(func.overloadpacket.__name__)
                if scratch and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda":
                    # a kernel's own temporary, freed before it returns: alive with everything live now
                    tracker.peak = max(tracker.peak, tracker.live + scratch(args[0]))
                inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                          if isinstance(a, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                        st = t.untyped_storage()
                        key, n = st._cdata, st.nbytes()
                        if n and key not in tracker._seen and key not in inputs:
                            tracker._seen.add(key)
                            tracker.live += n
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, release, key, n)
                return out

        self._mode = Mode()

    def reset(self) -> None:
        self.peak = self.live

    def __enter__(self) -> DevicePeak:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def _build(recipe: Recipe, config: Any, world: int, rank: int):
    """The recipe's model as ``prepare_model`` makes it, on the meta device (outside FakeTensorMode: peft's
    adapter moves cannot swap fake parameters), and this rank's SP group."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from seqpar.parallel import group_ranks
    from seqpar.train.memory import apply_memory
    from seqpar.train.model import apply_rope_scaling, patch_for_training, torch_dtype

    a = recipe.attention
    sp_groups, _ = group_ranks(world, a.sp_size)
    group = dist.group.WORLD
    if a.sp_size < world:
        for ranks in sp_groups:  # every rank creates every group (torch.distributed's rule)
            g = dist.new_group(ranks)
            if rank in ranks:
                group = g
    apply_rope_scaling(recipe, config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(recipe))
    try:
        with torch.device("meta"):  # no memory, no initialisation; on fake CUDA once the model is complete
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    model = patch_for_training(model, recipe, group)
    # DeepSpeed casts every parameter to the training dtype when it builds its engine (buffers stay): LoRA's
    # float32 adapters too, so they do not upcast their inputs.
    dtype = torch_dtype(recipe)
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)
    offload = recipe.memory.offload_checkpoints
    recipe.memory.offload_checkpoints = False  # applied below with force: no real CUDA in this process
    try:
        apply_memory(model, recipe)
    finally:
        recipe.memory.offload_checkpoints = offload
    if offload:
        from seqpar.models.offload import enable_checkpoint_offload

        enable_checkpoint_offload(model, force=True)
    model.train()
    return model, group


def step_peaks(recipe: Recipe, config: Any, world: int, seq_lens: list[int], rank: int = 0,
               layers: int | None = None) -> list[tuple[int, int]]:
    """(forward, backward) activation peaks of one micro-batch at each of ``seq_lens``, as ``rank`` of ``world``
    on fake CUDA; ``layers``: build only that many decoder layers. Needs the shim (``seqpar.fake_cuda.active()``)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from seqpar import fake_cuda
    from seqpar.models import causal_lm_loss, patched_layout, shard_batch
    from seqpar.train.memory import loss_chunk

    if not fake_cuda.active():
        raise RuntimeError("seqpar: step_peaks needs the fake-CUDA shim: run it in a process started with "
                           "seqpar.fake_cuda.environ()")
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # an H100: a CPU-only build knows no device
    if layers:
        config = copy.deepcopy(config)
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    out = []
    with fake_cuda.fake_group(rank, world), FakeTensorMode(allow_non_fake_inputs=True):
        with torch._C._DisableTorchDispatch():  # FakeTensorMode's own: the build is plain meta tensors
            model, group = _build(recipe, config, world, rank)
        model.to_empty(device="cuda")
        for p in model.parameters():
            if p.requires_grad:  # DeepSpeed copies each gradient into its bucket (the planner's) and frees it
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        vocab = model.config.vocab_size
        for seq_len in seq_lens:
            with DevicePeak() as peak:
                ids = torch.randint(0, vocab, (recipe.trainer.micro_batch, seq_len), device="cuda")
                local = shard_batch({"input_ids": ids}, group, patched_layout(model))
                labels = local.pop("labels")
                loss = causal_lm_loss(model, local, labels, group, chunk_size=loss_chunk(recipe), reduction="sum")
                forward = peak.peak
                peak.reset()
                loss.backward()
                backward = peak.peak
                del loss, local, labels, ids
            out.append((forward, backward))
    return out


def simulate(recipe: Recipe, config: Any, world: int, seq_lens: list[int] | None = None,
             rank: int = 0, layers: int | None = None) -> list[Simulated]:
    """Simulated steps of ``recipe`` at each of ``seq_lens`` (default: data.seq_len) as ``rank`` of ``world``;
    in this process if it has the fake-CUDA shim, else in a child that has it. ``layers``: the steps run that
    many decoder layers (the state is still planned for all of them; see ``longest_simulated``)."""
    return simulate_many([(recipe, config, world, seq_lens)], rank, layers)[0]


def simulate_many(jobs: list[tuple[Recipe, Any, int, list[int] | None]], rank: int = 0,
                  layers: int | None = None) -> list[list[Simulated]]:
    """``simulate`` of several (recipe, config, world, seq_lens) in one child process (one start-up paid)."""
    from seqpar import fake_cuda

    lens = [seq_lens or [recipe.data.seq_len] for recipe, _, _, seq_lens in jobs]
    if fake_cuda.active():
        peaks = [step_peaks(recipe, config, world, n, rank, layers)
                 for (recipe, config, world, _), n in zip(jobs, lens)]
    else:
        peaks = _in_child([(recipe, world, n) for (recipe, _, world, _), n in zip(jobs, lens)], rank, layers)
    return [[Simulated(n, f, b, plan_memory(recipe, config, world, n)) for n, (f, b) in zip(ns, pk)]
            for (recipe, config, world, _), ns, pk in zip(jobs, lens, peaks)]


def _in_child(jobs: list[tuple[Recipe, int, list[int]]], rank: int,
              layers: int | None = None) -> list[list[tuple[int, int]]]:
    from seqpar import fake_cuda

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "jobs.json", Path(tmp) / "peaks.json"
        spec.write_text(json.dumps([{"recipe": r.to_dict(), "world": w, "seq_lens": n, "layers": layers}
                                    for r, w, n in jobs]))
        cmd = [sys.executable, "-m", "seqpar.train.simulate", str(spec), str(out), "--rank", str(rank)]
        try:
            env = fake_cuda.environ({**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")) if p)})
        except RuntimeError as err:  # the shim did not build: no compiler or ninja
            raise RecipeError(f"--simulate: {err}; run without --simulate for the planner's estimate alone") from err
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [x for x in done.stderr.strip().splitlines() if "Warning" not in x and "warn(" not in x]
            tail = " / ".join(lines[-3:]) or "no output"
            raise RecipeError(f"--simulate: the simulated step failed ({tail}); run without --simulate for the "
                              "planner's estimate alone")
        return [[tuple(x) for x in job] for job in json.loads(out.read_text())]


def search_layers(recipe: Recipe) -> int | None:
    """How many decoder layers the length search simulates: 2 when gradient checkpoints are offloaded (then the
    device's activation peak does not depend on the layer count: the kept layer inputs are on the host; measured
    on Llama-3-8B at 128k on 8 ranks, the same forward and backward peaks with 2 and 32 layers), else all."""
    m = recipe.memory
    return 2 if m.offload_checkpoints and recipe.trainer.gradient_checkpointing else None


def longest_simulated(recipe: Recipe, config: Any, world: int, budget: int, start: int) -> tuple[int, list]:
    """The longest ``data.seq_len`` (a multiple of 2 x sp_size x 64) whose simulated peak fits ``budget``,
    searched from the planner's answer ``start``. The peak is linear in the length once the state is paid, so
    steps at ``start`` and ``start / 2`` (one child) give the line, and its crossing of the budget is checked by
    one more step (a second child), stepping back 2% at a time (at most 3 more children) while it does not fit.
    Returns the length and every probe."""
    unit = 2 * recipe.attention.sp_size * 64
    layers = search_layers(recipe)

    def down(n: float) -> int:
        return max(unit, int(n) // unit * unit)

    probes = simulate(recipe, config, world, [down(start), down(start / 2)], layers=layers)
    a, b = probes
    slope = (a.total - b.total) / max(1, a.seq_len - b.seq_len)
    guess = down(a.seq_len + (budget - a.total) / slope) if slope > 0 else a.seq_len
    for _ in range(4):
        if guess in {p.seq_len for p in probes}:
            break
        probe = simulate(recipe, config, world, [guess], layers=layers)[0]
        probes.append(probe)
        if probe.total <= budget:
            break
        guess = down(guess * 0.98)
    fits = [p for p in probes if p.total <= budget]
    return (max(p.seq_len for p in fits) if fits else 0), probes


def describe_simulated(recipe: Recipe, config: Any, world: int, device_memory: str | None) -> str:
    """The ``--simulate`` lines: the simulated step's peak and breakdown; with a device size, the longest
    ``data.seq_len`` whose simulated peak fits it (10% headroom kept, as the planner's)."""
    sim = simulate(recipe, config, world)[0]
    lines = sim.lines()
    if device_memory:
        from seqpar.train.planner import longest_seq_len, parse_bytes

        budget = int(parse_bytes(device_memory) * 0.9)
        start = longest_seq_len(recipe, config, world, budget)
        if start:
            best, probes = longest_simulated(recipe, config, world, budget, start)
            layers = search_layers(recipe)
            lines.append(f"longest data.seq_len within {device_memory} per rank by simulated steps (10% headroom "
                         f"kept): {best} tokens (probes: " + ", ".join(f"{p.seq_len}: {gib(p.total)}" for p in probes)
                         + (f"; steps of {layers} decoder layers, checkpoints offloaded" if layers else "") + ")")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """The child: ``python -m seqpar.train.simulate JOBS.json OUT.json [--rank R]``; JOBS.json is a list of
    ``{"recipe": Recipe.to_dict(), "world": N, "seq_lens": [...]}``, OUT.json gets their (forward, backward)
    peaks."""
    parser = argparse.ArgumentParser(prog="python -m seqpar.train.simulate")
    parser.add_argument("jobs")
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args(argv)
    from seqpar.train.validate import validate

    results = []
    for job in json.loads(Path(args.jobs).read_text()):
        recipe = recipe_from_dict(job["recipe"])
        config = validate(recipe, job["world"])
        results.append(step_peaks(recipe, config, job["world"], job["seq_lens"], args.rank, job.get("layers")))
    Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Without the interpreter's teardown: in a fake-CUDA process it sometimes aborts in a C++ destructor ("terminate
    # called without an active exception", a thread still joinable) after the results are written.
    os._exit(code)
