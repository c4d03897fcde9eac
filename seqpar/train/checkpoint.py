"""Atomic checkpoints: ``<dir>/step-00000010/`` appears only when complete.

Layout of one checkpoint::

    step-00000010/
      deepspeed/        engine.save_checkpoint: model + optimizer + LR-scheduler state (ZeRO partitions)
      fsdp2/            (engine: fsdp2, instead of deepspeed/) torch.distributed.checkpoint: every rank's shards
                        of the trainable weights and their AdamW states, .metadata, schedule.json
      adapter/          peft save_pretrained (safetensors): LoRA + trainable embed/norm   (LoRA runs)
      model/            plain transformers save_pretrained (safetensors)                  (full fine-tuning)
      rng/rank{r}.pt    python / torch / CUDA RNG states of every rank
      recipe.yaml       the resolved recipe
      trainer_state.json  step, data position and world size
      manifest.json     every file above with its size
      COMPLETE          written last

Every rank writes into ``.tmp-step-.../``; after a barrier rank 0 writes the marker and renames the folder
(an atomic rename on one filesystem). A crash mid-save leaves only a ``.tmp-`` folder, which is never
mistaken for a checkpoint and is removed by the next save. Both engines go through the same steps: only what
lands in ``deepspeed/`` or ``fsdp2/`` differs.

Before resuming, ``verify_checkpoint`` (every rank, before any collective) checks the manifest (truncated,
missing or added files), the pickle files' imports (torch's ``weights_only`` allow-list plus DeepSpeed's
state classes: DeepSpeed itself unpickles without that restriction; for DCP, the globals of its pickled
``.metadata``, read without unpickling, and no pickled non-tensor entries), and that the checkpoint was
written for this model, engine and (DeepSpeed: ZeRO shards are per rank) world size; DCP reshards, so an FSDP2
checkpoint resumes on another world size. Sizes, not hashes: hashing a 7B full fine-tuning checkpoint would
take minutes.
"""

from __future__ import annotations

import json
import random
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.train import faults
from seqpar.train.recipe import Recipe, RecipeError, save_recipe

MARKER = "COMPLETE"


def checkpoint_root(recipe: Recipe) -> Path:
    return Path(recipe.checkpoint.dir or Path(recipe.trainer.output_dir) / "checkpoints")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_weights(module: Any, folder: Path, *, zero_stage: int, rank: int) -> None:
    """Weights out of DeepSpeed as safetensors: the peft adapter (LoRA + extras) or the whole model.

    Collective under ZeRO-3: parameters are partitioned there, so they are gathered first (saving without
    gathering writes an empty adapter, a known ZeRO-3 pitfall).
    """
    import deepspeed

    is_peft = hasattr(module, "peft_config")
    params = [p for p in module.parameters() if p.requires_grad or not is_peft]
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        if rank == 0:
            if is_peft:
                module.save_pretrained(folder / "adapter", safe_serialization=True)
            else:
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                module.save_pretrained(folder / "model", state_dict=state, safe_serialization=True)


def export_fsdp2_weights(engine: Any, folder: Path, *, rank: int) -> None:
    """Collective: the FSDP2 engine's unsharded weights (DCP's full state dict, on rank 0's CPU) written by
    rank 0 as the same safetensors as the DeepSpeed path: the peft adapter or the whole model."""
    state = engine.full_state_dict()
    if rank != 0:
        return
    module = engine.module
    if hasattr(module, "peft_config"):
        module.save_pretrained(folder / "adapter", state_dict=state, safe_serialization=True)
    else:
        module.save_pretrained(folder / "model", state_dict=state, safe_serialization=True)


def save_checkpoint(engine: Any, recipe: Recipe, step: int, *, rank: int, base_model: Path,
                    tokenizer: Any = None) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    root = checkpoint_root(recipe)
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    lora, fsdp2 = recipe.lora.enabled, recipe.engine == "fsdp2"
    if fsdp2:
        engine.save_state(tmp / "fsdp2")
    else:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=lora)
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    world = dist.get_world_size() if dist.is_initialized() else 1
    faults.maybe_kill("save", step, rank, world)
    if fsdp2:
        export_fsdp2_weights(engine, tmp, rank=rank)
    else:
        export_weights(engine.module, tmp, zero_stage=recipe.deepspeed.zero_stage, rank=rank)
    _barrier()
    if rank == 0:
        save_recipe(recipe, tmp / "recipe.yaml")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "data_position": step, "world_size": world, "base_model": str(Path(base_model).resolve()),
             "engine": recipe.engine}))
        write_manifest(tmp)
        (tmp / MARKER).write_text("ok\n")  # last: its presence means everything above is on disk
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(root)[: -recipe.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine: Any, folder: Path, *, rank: int, lora: bool) -> int:
    """Restore model, optimizer, scheduler and RNG states; return the step to continue from."""
    if (folder / "fsdp2").is_dir():
        engine.load_state(folder / "fsdp2")
    else:
        engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=not lora)
    rng = folder / "rng" / f"rank{rank}.pt"
    if rng.is_file():  # absent when resuming on a different world size
        _set_rng_state(torch.load(rng, weights_only=True))
    return int(json.loads((folder / "trainer_state.json").read_text())["step"])


def saved_world_size(folder: Path) -> int | None:
    """The world size that wrote the checkpoint (trainer_state.json), or None if unreadable."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Verification before resuming: complete, untampered, safe to unpickle, and written for this model and world

MANIFEST = "manifest.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# Classes DeepSpeed pickles into its ZeRO optimizer states, beyond torch's weights_only allow-list.
DEEPSPEED_GLOBALS = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address"}


class CheckpointError(RecipeError):
    """A checkpoint that must not be resumed from: incomplete, tampered with, unsafe, or for another run."""


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, MARKER)}


def write_manifest(folder: Path) -> None:
    """Every file of the checkpoint with its size (written by rank 0 after the barrier, before the marker)."""
    (folder / MANIFEST).write_text(json.dumps({"files": _files(folder)}, indent=1))


def unsafe_globals(path: Path) -> list[str]:
    """Python names unpickling ``path`` would import beyond tensors and plain data (read, never executed)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [g for g in found if g not in DEEPSPEED_GLOBALS]


def _fix(folder: Path) -> str:
    return (f"delete {folder} to resume from the checkpoint before it, or start fresh (no --resume, "
            "checkpoint.resume=never)")


def _check_pickle(folder: Path, rel: str) -> None:
    fix = _fix(folder)
    try:
        bad = unsafe_globals(folder / rel)
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder}: {rel} refused: not a readable torch.save file "
                              f"({str(err).splitlines()[0][:120]}); it is corrupt or truncated: {fix}") from err
    if bad:
        raise CheckpointError(f"checkpoint {folder}: {rel} refused: unpickling it would import {bad}, which could "
                              f"run code (not written by seqpar train): {fix}")


def _check_files(folder: Path) -> None:
    fix = _fix(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder} has no readable {MANIFEST} ({type(err).__name__}): it is "
                              f"incomplete or corrupt: {fix}") from err
    present = _files(folder)
    for rel, size in listed.items():
        if rel not in present:
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing: the checkpoint is incomplete: {fix}")
        if present[rel] != size:
            what = "truncated" if present[rel] < size else "corrupt (larger than written)"
            raise CheckpointError(f"checkpoint {folder}: {rel} is {what} ({present[rel]} of {size} bytes): {fix}")
    for rel in present:
        if rel not in listed:
            raise CheckpointError(f"checkpoint {folder}: {rel} refused: not written by seqpar (absent from "
                                  f"{MANIFEST}): remove it, or delete the checkpoint")
        if Path(rel).suffix in PICKLE_SUFFIXES:
            _check_pickle(folder, rel)
        if Path(rel).name == ".metadata":
            _check_dcp_metadata(folder, rel)


# DCP's .metadata is a plain pickle (FileSystemReader calls pickle.load): the classes it may name. Tensors in
# the .distcp files are read with weights_only=True; pickled non-tensor entries (BytesStorageMetadata) would be
# unpickled without restriction, and seqpar never writes any.
DCP_MODULES = ("torch.distributed.checkpoint.",)
DCP_GLOBALS = {"torch.Size", "torch.serialization._get_layout", "pathlib.PosixPath", "pathlib.WindowsPath",
               "pathlib.PurePosixPath", "collections.OrderedDict", "builtins.set", "builtins.frozenset"}


def pickle_globals(path: Path) -> list[str]:
    """Every ``module.name`` a plain pickle would import, read without running any of it: the unpickler
    resolves each global to an inert stub (no import, no call, no ``__setstate__`` of a real class)."""
    import pickle

    found: list[str] = []

    class Stub:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __setstate__(self, state: Any) -> None:
            pass

        def __setitem__(self, key: Any, value: Any) -> None:
            pass

        def append(self, value: Any) -> None:
            pass

        def extend(self, values: Any) -> None:
            pass

        add = append

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found.append(f"{module}.{name}")
            return type("Stub", (Stub,), {})

        def persistent_load(self, pid: Any) -> Any:
            return None

    with path.open("rb") as fh:
        Reader(fh).load()
    return found


def _dcp_global_ok(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if name in DCP_GLOBALS or (module + ".").startswith(DCP_MODULES):
        return not name.endswith(".BytesStorageMetadata")
    return module == "torch" and isinstance(getattr(torch, attr, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format))


def _check_dcp_metadata(folder: Path, rel: str) -> None:
    try:
        bad = sorted({g for g in pickle_globals(folder / rel) if not _dcp_global_ok(g)})
    except Exception as err:  # a truncated or foreign file: any failure to read it refuses the checkpoint
        raise CheckpointError(f"checkpoint {folder}: {rel} refused: not a readable checkpoint index "
                              f"({type(err).__name__}); it is corrupt or truncated: {_fix(folder)}") from err
    if bad:
        raise CheckpointError(f"checkpoint {folder}: {rel} refused: unpickling it would import {bad}, which could "
                              f"run code (not written by seqpar train): {_fix(folder)}")


def _model_differences(saved: Recipe, recipe: Recipe) -> list[str]:
    def facts(r: Recipe) -> dict:
        m, lo = r.model, r.lora
        out = {"model.path": str(Path(m.path).resolve()) if m.path else None,
               "lora.enabled": lo.enabled, "lora.targets": lo.targets if lo.enabled else None,
               "lora.r": lo.r if lo.enabled else None}
        out.update({f"model.from_config.{k}": v for k, v in (m.from_config or {}).items()})
        return out

    a, b = facts(saved), facts(recipe)
    return [f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def verify_checkpoint(folder: Path, recipe: Recipe, world_size: int) -> int:
    """Raise CheckpointError unless ``folder`` can be resumed by this recipe on ``world_size`` ranks; return its
    step. Reads only JSON, YAML and pickle opcodes (nothing is unpickled), so every rank may call it before any
    collective and they all reach the same verdict."""
    from seqpar.train.recipe import load_recipe

    _check_files(folder)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step, saved = int(state["step"]), load_recipe(folder / "recipe.yaml")
    except (OSError, ValueError, KeyError, RecipeError) as err:
        raise CheckpointError(f"checkpoint {folder}: trainer_state.json or recipe.yaml is unreadable "
                              f"({type(err).__name__}): delete the checkpoint to resume from the one before it, "
                              "or start fresh (no --resume, checkpoint.resume=never)") from err
    saved_engine = state.get("engine", "deepspeed")
    if saved_engine != recipe.engine:
        raise CheckpointError(f"checkpoint {folder} was written by engine={saved_engine}; this run has "
                              f"engine={recipe.engine}: resume it with engine={saved_engine}, or start fresh in a new "
                              "trainer.output_dir (its adapter/ or model/ folder holds the weights either engine can "
                              "start from)")
    diff = _model_differences(saved, recipe)
    if diff:
        raise CheckpointError(f"checkpoint {folder} was written for a different model ({'; '.join(diff)}): resume "
                              "it with the recipe that wrote it, or give this run a new trainer.output_dir "
                              "(or checkpoint.dir)")
    saved_world = state.get("world_size", world_size)
    if saved_world != world_size and recipe.engine == "deepspeed":
        raise CheckpointError(f"checkpoint {folder} was written by world size {saved_world}; this run has "
                              f"{world_size}: launch {saved_world} processes to resume it (ZeRO shards are per "
                              "rank), or start fresh in a new trainer.output_dir")
    return step


# ----------------------------------------------------------------------------------------------------------
# Reruns into an existing output folder: resume the earlier run, or refuse (never overwrite or mix)


def earlier_run(recipe: Recipe) -> list[Path]:
    """What an earlier run left in this run's folders: complete checkpoints, metrics.jsonl, the built base model."""
    out = Path(recipe.trainer.output_dir)
    found = complete_checkpoints(checkpoint_root(recipe))
    found += [p for p in (out / "metrics.jsonl",) if p.is_file()]
    if recipe.model.from_config is not None:
        from seqpar.train.model import BASE_DIR

        found += [p for p in (out / BASE_DIR,) if (p / "config.json").is_file()]
    return found


def refuse_earlier_run(recipe: Recipe, resume: bool, parallel: Any = None) -> None:
    """Raise RecipeError (on every rank alike) when this run would write over an earlier run without resuming it:
    its metrics would get repeated steps and its newer checkpoints would outlive ours. Collective when
    ``parallel`` is given (one all-reduce: ranks on different filesystems still agree); call it before any
    rank writes anything."""
    resume = resume or recipe.checkpoint.resume == "auto"
    found = earlier_run(recipe)
    flag = torch.tensor([0 if resume or not found else 1], device=getattr(parallel, "device", "cpu"))
    if parallel is not None and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = found[0] if found else recipe.trainer.output_dir
        raise RecipeError(f"trainer.output_dir={recipe.trainer.output_dir!r} holds an earlier run ({where}): resume "
                          "it with --resume (or checkpoint.resume=auto), or give this run a new trainer.output_dir "
                          "(nothing of the earlier run is overwritten)")
