"""Run metrics: a JSONL file in the output folder (always; tests and scripts read it), wandb (offline unless
the recipe says otherwise, files under ``<output_dir>/wandb``), and a tqdm bar with loss, tokens/s and ETA.

Only rank 0 writes; peak memory is gathered from every rank at each logged step.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seqpar.train import wandb_history
from seqpar.train.recipe import Recipe


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


def gather_floats(value: float) -> list[float]:
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after every step (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def wandb_run_id(folder: Path, resumed: bool) -> str:
    """One wandb run per training run: a resumed (requeued) run continues the id kept in ``folder/run_id``."""
    path = folder / "run_id"
    if resumed and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb's format: 8 characters [0-9a-z]
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    def __init__(self, recipe: Recipe, *, rank: int, start_step: int, resumed: bool):
        self.rank, self.every = rank, recipe.logging.log_every
        self.start_step, self.max_steps, self.t0 = start_step, recipe.trainer.max_steps, time.perf_counter()
        self.out = Path(recipe.trainer.output_dir)
        self.wandb = self.bar = None
        if rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines:  # steps after the checkpoint (all, without one) are trained again: keep each step once
            path.write_text("".join(x + "\n" for x in lines if _step(x) <= start_step))
        self.file = path.open("a")
        self.sent = start_step  # wandb holds the steps up to here
        lg = recipe.logging
        if lg.wandb and lg.mode != "disabled":
            os.environ.setdefault("WANDB_DIR", str(self.out / "wandb"))
            os.environ.setdefault("WANDB_SILENT", "true")
            (self.out / "wandb").mkdir(exist_ok=True)
            import wandb

            run_id = wandb_run_id(self.out / "wandb", resumed)
            # The last step the run holds: offline, read from its files (its service may have died with the
            # job's signal before writing the last steps); online, the last one logged before.
            logged = max([0, *(s for s in map(_step, lines) if s != float("inf"))])
            held = wandb_history.last_step(self.out / "wandb", run_id) if lg.mode == "offline" else logged
            self.wandb = wandb.init(project=lg.project, name=lg.name, mode=lg.mode, config=recipe.to_dict(),
                                    dir=os.environ["WANDB_DIR"], resume="allow" if resumed else None, id=run_id)
            for line in lines:  # steps metrics.jsonl has and wandb lost, from metrics.jsonl
                if held < _step(line) <= start_step:
                    self._to_wandb(json.loads(line))
            # wandb cannot drop rows: it keeps its first record of a step trained twice (after a crash)
            self.sent = max(held, start_step)
        from tqdm import tqdm

        self.bar = tqdm(total=recipe.trainer.max_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not sys.stderr.isatty() and os.environ.get("SEQPAR_TQDM") != "1")

    def log(self, step: int, metrics: dict, device: torch.device) -> None:
        """Collective when the step is logged (peak memory of every rank)."""
        if step % self.every and step != metrics.get("max_steps"):
            if self.bar is not None:
                self.bar.update(1)
            return
        metrics = {k: v for k, v in metrics.items() if k != "max_steps"}
        metrics["peak_memory_mb"] = [round(m, 1) for m in gather_floats(peak_memory_mb(device))]
        if self.rank != 0:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if step > self.sent:
            self._to_wandb(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            self.bar.update(1)
            if not self.bar.disable:
                return
        per_step = (time.perf_counter() - self.t0) / max(1, step - self.start_step)
        print(f"step {step}/{self.max_steps} loss {metrics['loss']:.6f} lr {metrics['lr']:.3g} "
              f"tokens/s {metrics['tokens_per_s']:.0f} eta {per_step * (self.max_steps - step):.0f}s", flush=True)

    def _to_wandb(self, record: dict) -> None:
        if self.wandb is None:
            return
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        flat.update({f"peak_memory_mb/rank{r}": m for r, m in enumerate(record["peak_memory_mb"])})
        try:
            self.wandb.log(flat, step=record["step"])
        except (OSError, RuntimeError) as err:  # e.g. its service process got the job's SIGTERM and ended
            print(f"seqpar: wandb stopped at step {record['step']} ({type(err).__name__}: {err}); metrics.jsonl "
                  "goes on, and a resumed run sends wandb the steps it missed", flush=True)
            self.wandb = None

    def close(self) -> None:
        if self.rank != 0:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except (OSError, RuntimeError) as err:
                print(f"seqpar: wandb could not finish ({type(err).__name__}: {err})", flush=True)
