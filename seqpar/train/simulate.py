"""``seqpar train RECIPE --dry-run --simulate``: one real training step of the recipe's model, as one rank of the
planned world, on fake CUDA (no GPU, no weights, no memory), and that rank's peak of live device bytes next to
the analytic planner's (seqpar.train.planner).

Why: the planner is a formula, right only for what it was written for; a simulated step runs the code a GPU
would (the real model class at its real size, the patched attention primitive over a fake process group of W
ranks, gradient checkpointing and its offload, the tiled MLP, the fused loss) and counts what it allocates.
Under ``torch._subclasses.fake_tensor.FakeTensorMode`` a CUDA tensor has a shape, a dtype and a device but no
storage bytes behind it, so Llama-3-8B at 128k tokens per rank runs in seconds on a laptop. The step builds only
a prefix of the decoder layers that holds one of each kind (``LayerPlan``: same module classes, parameter shapes
and settings; 2 of Llama's 32, 5 of Qwen3-Next's 48) and adds what each left-out layer keeps as its counterpart
measured (``step_peaks``): a fake step still costs the Python of every op, and the delta rule's and the scans'
chunk loops made a whole Qwen3-Next or Kimi Linear step take over 5 minutes. A CPU-only PyTorch
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
    layers: int = 0  # decoder layers the step ran (the rest added as alike layers keep: ``step_peaks``)

    @property
    def total(self) -> int:
        return self.plan.total_of(self.plan.phases_of(self.forward, self.backward))

    def lines(self) -> list[str]:
        p = self.plan
        return [f"simulated peak memory per rank: {gib(self.total)} (one step on fake CUDA, {p.tokens_per_rank} "
                f"tokens per rank; planner {gib(p.total)}, {p.total / max(1, self.total):.2f}x of it)",
                f"  measured activations: forward {gib(self.forward)} (planner {gib(_planned_forward(p))}), "
                f"backward {gib(self.backward)} (planner {gib(_planned_backward(p))})"
                + (f"; {self.layers} decoder layers run, the others counted as the alike layer keeps"
                   if self.layers else ""),
                f"  by the planner's formulas (DeepSpeed does not run on fake tensors): parameters {gib(p.params)}, "
                f"gradients {gib(p.grads)}, optimizer states {gib(p.optimizer)}, deepspeed buffers "
                + ", ".join(f"{k} {gib(v)}" for k, v in p.buffers.items())]

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "forward": self.forward, "backward": self.backward, "total": self.total,
                "planner": self.plan.total, "tokens_per_rank": self.plan.tokens_per_rank, "layers": self.layers}


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


def device_peak():
    """Live bytes of (fake) CUDA storages and their peak, kernels' temporaries included
    (``seqpar.bench.measure.TrackedPeak``)."""
    from seqpar.bench.measure import TrackedPeak

    return TrackedPeak(device="cuda", workspace=WORKSPACE)


def _build(recipe: Recipe, config: Any):
    """The recipe's model as ``prepare_model`` makes it, on the meta device (outside FakeTensorMode: peft's
    adapter moves cannot swap fake parameters), and this rank's SP group."""
    import torch
    from transformers import AutoModelForCausalLM

    from seqpar.parallel import ParallelState
    from seqpar.train.memory import apply_memory
    from seqpar.train.model import apply_rope_scaling, patch_for_training, torch_dtype

    parallel = ParallelState.from_initialized(recipe.attention.sp_size, device="cuda")  # the trainer's groups
    apply_rope_scaling(recipe, config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(recipe))
    try:
        with torch.device("meta"):  # no memory, no initialisation; on fake CUDA once the model is complete
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    model = patch_for_training(model, recipe, parallel)
    # DeepSpeed casts every parameter to the training dtype when it builds its engine (buffers stay): LoRA's
    # float32 adapters too, so they do not upcast their inputs.
    dtype = torch_dtype(recipe)
    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != dtype:
            p.data = p.data.to(dtype)
    apply_memory(model, recipe, force_offload=True)  # this process has no real CUDA: offload anyway
    model.train()
    return model, parallel.sp_group


def _signature(layer: Any) -> tuple:
    """What makes two decoder layers allocate alike: their module classes, parameter shapes and settings (the
    plain attributes of their modules: a layer's ``layer_type``, ``sliding_window``; its index left out)."""
    settings = tuple((n, k, repr(v)) for n, m in layer.named_modules() for k, v in sorted(vars(m).items())
                     if not k.startswith("_") and "idx" not in k and isinstance(v, (str, int, float, bool, type(None))))
    return (tuple((n, type(m).__name__) for n, m in layer.named_modules()),
            tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()), settings)


def _signatures(config: Any) -> list[tuple]:
    from seqpar.train.model import decoder_layers, meta_model

    model = meta_model(config)  # None: not buildable, and the step's own build says why
    return [] if model is None else [_signature(layer) for layer in decoder_layers(model)]


def _truncated(config: Any, layers: int) -> Any:
    """``config`` with its first ``layers`` decoder layers: per-layer lists (``layer_types``, ``mlp_layer_types``)
    cut to match; lists of layer indices (Bamba's ``attn_layer_indices``) are left as they are."""
    n = config.num_hidden_layers
    config = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            setattr(config, key, value[:layers])
    config.num_hidden_layers = layers
    return config


@dataclass
class LayerPlan:
    """Which decoder layers a simulated step builds: a prefix of ``layers`` that holds a layer of every kind (same
    module classes and parameter shapes) before its last one, and for each of the model's layers the prefix layer
    of its kind that stands for it. The last layer is not one: what it makes is not kept as the next layer's
    input (the final norm takes it instead)."""

    layers: int
    total: int
    kind: list[int]  # kind[i]: the last prefix layer alike layer i, before the prefix's last layer

    @classmethod
    def of(cls, config: Any, layers: int | None = None) -> LayerPlan:
        full = _signatures(config)
        n = len(full)
        k = min(n, layers or max(full.index(sig) for sig in set(full)) + 2)
        if k >= n:
            return cls(n, n, list(range(n)))
        if set(full[:k - 1]) != set(full):
            raise RecipeError(f"--simulate: the first {k - 1} decoder layers do not hold one of each kind of the "
                              f"model's {n}")
        if _signatures(_truncated(config, k)) != full[:k]:  # the config cannot be cut without changing a layer
            return cls(n, n, list(range(n)))
        last = {sig: i for i, sig in enumerate(full[:k - 1])}
        return cls(k, n, [i if i < k else last[sig] for i, sig in enumerate(full)])

    def extra(self, kept: dict[int, int]) -> int:
        """Bytes the layers left out keep for the backward, each as its prefix counterpart keeps: ``kept[i]``,
        the bytes made in layer i's forward still alive at the loss. The model's last layer stands where the
        prefix's last layer stood, so the layers from the prefix's length on count as middle layers."""
        return sum(max(0, kept.get(self.kind[i], 0)) for i in range(self.layers, self.total))


def step_peaks(recipe: Recipe, config: Any, world: int, seq_lens: list[int], rank: int = 0,
               layers: int | None = None) -> list[tuple[int, int, int]]:
    """(forward, backward, layers simulated) activation peaks of one micro-batch at each of ``seq_lens``, as
    ``rank`` of ``world`` on fake CUDA. Needs the shim (``seqpar.fake_cuda.active()``).

    The step builds a prefix of the decoder layers holding a layer of each kind before its last (``LayerPlan``:
    by default the shortest; ``layers``: that many): the rest add what each of them keeps for the backward,
    measured on the prefix layer alike it (the bytes made during its forward still alive at the loss), to both
    phases. Exact for the forward (the loss comes after every layer) and, for the backward, an upper bound by at
    most the bytes kept by the layers after the one whose backward peaks (fewer than one period of layer kinds):
    in checkpointed layers one layer input each, none with checkpoints offloaded."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from seqpar import fake_cuda
    from seqpar.models import causal_lm_loss, patched_layout, shard_batch
    from seqpar.train.memory import loss_chunk
    from seqpar.train.model import decoder_layers

    if not fake_cuda.active():
        raise RuntimeError("seqpar: step_peaks needs the fake-CUDA shim: run it in a process started with "
                           "seqpar.fake_cuda.environ()")
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # an H100: a CPU-only build knows no device
    plan = LayerPlan.of(config, layers)
    if plan.layers < plan.total:
        config = _truncated(config, plan.layers)
    out = []
    with fake_cuda.fake_group(rank, world), FakeTensorMode(allow_non_fake_inputs=True):
        with torch._C._DisableTorchDispatch():  # FakeTensorMode's own: the build is plain meta tensors
            model, group = _build(recipe, config)
        model.to_empty(device="cuda")
        for p in model.parameters():
            if p.requires_grad:  # DeepSpeed copies each gradient into its bucket (the planner's) and frees it
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        vocab = model.config.vocab_size
        for seq_len in seq_lens:
            with device_peak() as peak:
                hooks = []
                for i, layer in enumerate(decoder_layers(model)):
                    hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(peak, "owner", i)))
                    hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(peak, "owner", None)))
                ids = torch.randint(0, vocab, (recipe.trainer.micro_batch, seq_len), device="cuda")
                local = shard_batch({"input_ids": ids}, group, patched_layout(model))
                labels = local.pop("labels")
                loss = causal_lm_loss(model, local, labels, group, chunk_size=loss_chunk(recipe), reduction="sum")
                extra = plan.extra(peak.by_owner)
                forward = peak.peak + extra
                peak.reset()
                loss.backward()
                backward = peak.peak + extra
                for h in hooks:
                    h.remove()
                del loss, local, labels, ids
            out.append((forward, backward, plan.layers))
    return out


def simulate(recipe: Recipe, config: Any, world: int, seq_lens: list[int] | None = None,
             rank: int = 0, layers: int | None = None) -> list[Simulated]:
    """Simulated steps of ``recipe`` at each of ``seq_lens`` (default: data.seq_len) as ``rank`` of ``world``;
    in this process if it has the fake-CUDA shim, else in a child that has it. ``layers``: the steps run that
    many decoder layers, the others added as ``step_peaks`` says (default: the fewest holding one of each kind)."""
    return simulate_many([(recipe, config, world, seq_lens)], rank, layers)[0]


def simulate_many(jobs: list[tuple], rank: int = 0, layers: int | None = None) -> list[list[Simulated]]:
    """``simulate`` of several (recipe, config, world, seq_lens[, layers]) in one child process (one start-up
    paid); a job's own ``layers`` overrides the argument."""
    from seqpar import fake_cuda

    lens = [job[3] or [job[0].data.seq_len] for job in jobs]
    per_job = [job[4] if len(job) > 4 else layers for job in jobs]
    if fake_cuda.active():
        peaks = [step_peaks(recipe, config, world, n, rank, k)
                 for (recipe, config, world, *_), n, k in zip(jobs, lens, per_job)]
    else:
        peaks = _in_child([(job[0], job[2], n, k) for job, n, k in zip(jobs, lens, per_job)], rank)
    return [[Simulated(n, f, b, plan_memory(recipe, config, world, n), k) for n, (f, b, k) in zip(ns, pk)]
            for (recipe, config, world, *_), ns, pk in zip(jobs, lens, peaks)]


def _in_child(jobs: list[tuple[Recipe, int, list[int], int | None]], rank: int) -> list[list[tuple[int, int, int]]]:
    from seqpar import fake_cuda

    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "jobs.json", Path(tmp) / "peaks.json"
        spec.write_text(json.dumps([{"recipe": r.to_dict(), "world": w, "seq_lens": n, "layers": k}
                                    for r, w, n, k in jobs]))
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


def longest_simulated(recipe: Recipe, config: Any, world: int, budget: int, start: int) -> tuple[int, list]:
    """The longest ``data.seq_len`` (a multiple of 2 x sp_size x 64) whose simulated peak fits ``budget``,
    searched from the planner's answer ``start``. The peak is linear in the length once the state is paid, so
    steps at ``start`` and ``start / 2`` (one child) give the line, and its crossing of the budget is checked by
    one more step (a second child), stepping back 2% at a time (at most 3 more children) while it does not fit.
    Returns the length and every probe."""
    unit = 2 * recipe.attention.sp_size * 64

    def down(n: float) -> int:
        return max(unit, int(n) // unit * unit)

    probes = simulate(recipe, config, world, [down(start), down(start / 2)])
    a, b = probes
    slope = (a.total - b.total) / max(1, a.seq_len - b.seq_len)
    guess = down(a.seq_len + (budget - a.total) / slope) if slope > 0 else a.seq_len
    for _ in range(4):
        if guess in {p.seq_len for p in probes}:
            break
        probe = simulate(recipe, config, world, [guess])[0]
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
            lines.append(f"longest data.seq_len within {device_memory} per rank by simulated steps (10% headroom "
                         f"kept): {best} tokens (probes: " + ", ".join(f"{p.seq_len}: {gib(p.total)}" for p in probes)
                         + ")")
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
