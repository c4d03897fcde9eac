"""seqpar inside Hugging Face ``Trainer`` and TRL's ``SFTTrainer``: exact sequence parallelism with their own loop.

    model = patch_model(model, "ring", ParallelState.from_env(sp_size=2))   # before the Trainer is built
    trainer = SeqparTrainer(model=model, args=TrainingArguments(...), train_dataset=...)  # or SeqparSFTTrainer
    trainer.train()

What is exact, and through which seam (the Trainer's own loop, optimizer, DDP/DeepSpeed wrapping, logging and
checkpoints are untouched; only the hooks below are overridden):

* **Not accelerate's ``ParallelismConfig``.** In accelerate 1.16 (its SP/CP fields date from 1.12) ``sp_size`` takes
  only ``sp_backend="deepspeed"`` (DeepSpeed ALST: Ulysses attention registered by DeepSpeed, its data-loader
  adapter and its loss) and ``cp_size`` only ``cp_backend="torch"`` (FSDP2 + torch's ``context_parallel`` on the
  SDPA buffers). Neither can carry a seqpar SP group, and either would replace seqpar's attention, so both are
  refused (> 1) in one line. The SP group is the one the model was patched with (``patch_model``), read from the
  model.
* **The sampler** (``_get_train_sampler`` / ``_get_eval_sampler``, the Trainer's hook for the sample order) gives
  the ranks of one SP group the same sequences. accelerate deals the batches of the sampler round-robin to ALL
  ranks (``BatchSamplerShard``), so SP ranks would otherwise get different batches (the first complaint about
  SP in HF Trainer); ``SPBatchOrder`` yields each batch ``sp_size`` times in a row, so ranks
  ``[g*S, (g+1)*S)`` (seqpar's SP groups) receive batch g of each round. Each batch also carries a fingerprint
  of its full sequences, compared over the SP group once per optimizer step: any other order (dispatched
  batches, ``split_batches``, a sampler drawing from unsynchronised RNGs) fails in one line instead of training
  on mismatched shards. Iterable datasets (dispatched over all ranks) and ``batch_rebalance`` are refused.
* **The data collator** (``SPDataCollator``) shards each batch with ``seqpar.models.shard_batch``: labels are
  shifted over the WHOLE sequence before sharding (after sharding token t + 1 may live on another rank),
  position ids are global, packed documents (per-sample ``seq_lengths``, TRL's padding-free ``position_ids``)
  become global ``cu_seqlens`` with no target across a boundary, and the length is padded on the right to a
  multiple of ``sp_size`` (x2 for zigzag) with ignored labels. A collator runs per rank with no communication.
* **``compute_loss``** runs ``seqpar.models.causal_lm_loss`` (full logits, or the fused tiled head with
  ``loss_chunk_size``) with ``reduction="sum"``: this rank's summed token loss ``S``. ``_get_num_items_in_batch`` (the
  hook ``get_batch_samples`` calls to count ``num_items_in_batch`` for the accumulated batches) counts ``T``, the
  target tokens of the whole optimizer step over every micro-batch, SP rank and DP rank (one all-reduce of two
  integers, with the fingerprint check's flag), and the loss is ``S x W / T``: DDP (and DeepSpeed, FSDP) AVERAGE
  gradients over all W ranks, SP ranks included, so the average is ``sum S / T``, the gradient of the token mean of
  the global batch, exactly; a shard with no target contributes 0 (not NaN), a step with none is 0.
  ``loss_is_scaled_for_ga`` tells the Trainer not to divide by the accumulation steps again, and its logged loss (the
  mean over ranks of the returned values) is the step's exact token mean. DDP without this reduction (a plain Trainer)
  averages the SP ranks' partial gradients: ``SPDataCollator`` refuses to run outside a trainer that applies it.
* **``evaluation_loop``**: ``eval_loss`` is replaced by the token mean over the whole eval set (summed token
  losses / target tokens over every batch, SP rank and DP rank, one all-reduce), seqpar's ``evaluate`` rule,
  instead of a mean of per-rank shard means. The eval set must split evenly over ``eval_batch_size x dp_size``
  (accelerate would otherwise repeat samples to even the ranks and count them twice): refused otherwise.
  ``compute_metrics`` would see sharded logits: refused.

Communication added per optimizer step: one all-reduce of 2 int64 over the world (T, and a flag: did any SP
group get mismatched batches) and one of 2 int64 per micro-batch (the fingerprints) over the SP group; per eval
batch the SP loss's 2 float64, 2 int64 over the SP group and 1 over the world for the fingerprint check; per
evaluation one 2-float64 all-reduce.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import RandomSampler, Sampler, SequentialSampler
from transformers import Trainer

from seqpar.comm import group_size, world_sum
from seqpar.kernels.host import host_read
from seqpar.models.batch import IGNORE_INDEX, shard_batch, sp_global_mean, sp_group_of
from seqpar.parallel import ParallelState
from seqpar.sharding import chunks_per_rank, host_bounds, remember_bounds

FINGERPRINT = "seqpar_fingerprint"  # [1] int64: hash of the full (unsharded) batch, equal on every SP rank
BOUNDS = "seqpar_bounds"  # host ints of cu_seqlens: a device copy of the batch keeps no memo on the tensor
DOC_KEYS = ("seq_lengths", "seq_lens")  # per-sample packed document lengths (TRL's name, seqpar's name)

NO_REDUCTION = (
    "SPDataCollator's shards need the SP loss and gradient reduction, which DDP alone does not make (it would "
    "average the SP ranks' partial gradients, each a share of the sum): train with "
    "seqpar.integrations.hf.SeqparTrainer or SeqparSFTTrainer (docs/trainers.md), or in a loop of your own "
    "sum the gradients over the SP group (docs/examples/own_loop.py)"
)


def _fingerprint(batch: Mapping[str, Any]) -> int:
    """63-bit hash of the full batch's tokens, labels, padding mask and documents (CPU, no communication)."""
    digest = hashlib.blake2b(digest_size=8)
    for key in ("input_ids", "labels", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    digest.update(repr(list(batch.get("seq_lens") or ())).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


def _as_1d(x: Any, key: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"feature[{key!r}] must be one sequence (1-D), got shape {tuple(t.shape)}")
    return t.long()


def pad_and_stack(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The default collation: ``input_ids`` (and ``labels``, ``attention_mask`` when the features have them)
    right-padded to the longest sample; padding gets ``pad_token_id``, label -100 and mask 0."""
    ids = [_as_1d(f["input_ids"], "input_ids") for f in features]
    longest = max(len(x) for x in ids)
    out = {"input_ids": torch.stack([F.pad(x, (0, longest - len(x)), value=pad_token_id) for x in ids])}
    if any("labels" in f for f in features):  # a sample without labels is trained on all its tokens
        labels = [_as_1d(f["labels"], "labels") if "labels" in f else x for f, x in zip(features, ids)]
        out["labels"] = torch.stack([F.pad(y, (0, longest - len(y)), value=IGNORE_INDEX) for y in labels])
    masks = [_as_1d(f["attention_mask"], "attention_mask") if "attention_mask" in f else torch.ones_like(x)
             for f, x in zip(features, ids)]
    if any(len(x) < longest for x in ids) or any("attention_mask" in f for f in features):
        out["attention_mask"] = torch.stack([F.pad(m, (0, longest - len(m)), value=0) for m in masks])
    return out


def documents_from_positions(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per-row document lengths from position ids that restart at 0 at each document (TRL's padding-free and
    packed batches); None when every row is one ``0, 1, 2, ...`` run."""
    pos = torch.as_tensor(position_ids)
    if pos.dim() != 2:
        raise ValueError(f"batch['position_ids'] must be [B, L], got shape {tuple(pos.shape)}")
    L = pos.shape[1]
    if bool((pos == torch.arange(L)).all()):
        return None
    rows = []
    for row in pos:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise ValueError("batch['position_ids'] must start every row at 0 (documents restart at 0): seqpar "
                             "computes global positions itself, pass per-document positions or none")
        bounds = [*starts, L]
        expected = torch.cat([torch.arange(b - a) for a, b in itertools.pairwise(bounds)])
        if not torch.equal(row.cpu(), expected):
            raise ValueError("batch['position_ids'] are not 0, 1, 2, ... within each document: seqpar derives the "
                             "packed documents from where they restart at 0; pass seq_lengths per sample instead")
        rows.append([b - a for a, b in itertools.pairwise(bounds)])
    return rows


class SPDataCollator:
    """Collate a batch of full sequences, then keep this rank's shard (``seqpar.models.shard_batch``).

    Args:
        parallel: ``ParallelState``, the SP process group, or None (one device): the group the model was patched
            with.
        layout: the patched model's layout (``seqpar.models.patched_layout(model)``).
        collator: the collator that makes the full batch (e.g. TRL's ``DataCollatorForLanguageModeling``); None:
            ``pad_and_stack`` with per-sample documents from ``seq_lengths`` / ``seq_lens``.
        pad_token_id: token used to pad to a multiple of the SP size (x2 for zigzag).
        documents: whether the patched attention takes packed documents (``cu_seqlens``); packed batches are
            refused in one line otherwise.

    The full batch is ``input_ids [B, L]`` with optional unshifted ``labels`` (HF convention), a right-padding
    ``attention_mask`` and documents. Rows holding several documents are laid end to end as one row (row ends are
    document ends: the same batch, as ``seqpar train`` does). Returns ``shard_batch``'s
    ``{"input_ids", "position_ids", "labels", "cu_seqlens"?}`` (labels already shifted: the model is called with
    ``labels=None``) plus a fingerprint of the full batch; no communication (it may run in DataLoader workers).
    """

    def __init__(self, parallel: ParallelState | dist.ProcessGroup | None, layout: str, *,
                 collator: Callable[[list], Mapping[str, Any]] | None = None, pad_token_id: int = 0,
                 documents: bool = True):
        self.group = sp_group_of(parallel)
        self.sp_size = group_size(self.group)
        self.unit = self.sp_size * chunks_per_rank(layout)  # validates the layout
        self.layout, self.collator, self.pad_token_id, self.documents = layout, collator, pad_token_id, documents
        self.reduction: str | None = None  # set by a trainer that applies the SP loss and gradient reduction

    def full_batch(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The batch before sharding, in ``shard_batch``'s input form, padded to a multiple of the shard unit."""
        if self.collator is None:
            docs = [f.get("seq_lengths", f.get("seq_lens")) for f in features]
            batch = dict(pad_and_stack([{k: v for k, v in f.items() if k not in DOC_KEYS} for f in features],
                                       self.pad_token_id))
            rows = None
            if any(d is not None for d in docs):
                rows = []
                for i, (d, f) in enumerate(zip(docs, features)):
                    n = len(_as_1d(f["input_ids"], "input_ids"))
                    if d is not None and sum(int(x) for x in d) != n:
                        raise ValueError(f"sample {i} has seq_lengths {list(d)} (sum {sum(int(x) for x in d)}) for "
                                         f"{n} tokens: the packed documents' lengths must sum to len(input_ids)")
                    rows.append([n] if d is None else [int(x) for x in d])
        else:
            batch = dict(self.collator(list(features)))
            rows = documents_from_positions(batch["position_ids"]) if "position_ids" in batch else None
        if "shift_labels" in batch:
            raise ValueError("the collator returned 'shift_labels': give seqpar unshifted 'labels' (HF convention); "
                             "it shifts them over the whole sequence before sharding")
        ids = torch.as_tensor(batch["input_ids"]).long()
        if ids.dim() != 2:
            raise ValueError(f"batch['input_ids'] must be [B, L], got shape {tuple(ids.shape)}")
        labels = torch.as_tensor(batch.get("labels", ids)).long().clone()
        mask = batch.get("attention_mask")
        mask = None if mask is None else torch.as_tensor(mask).bool()
        seq_lens = None
        if rows is not None and any(len(r) > 1 for r in rows):
            if not self.documents:
                raise ValueError("the batch packs several documents per sequence but the patched attention takes no "
                                 "document boundaries: patch with a varlen primitive (ring, allgather, full) or do "
                                 "not pack")
            L = ids.shape[1]
            for r, row in enumerate(rows):
                if sum(row) > L or any(n < 0 for n in row):
                    raise ValueError(f"row {r} has document lengths {row} (sum {sum(row)}) for {L} tokens: "
                                     "seq_lengths must sum to the sample's length")
                if sum(row) < L:  # right padding is one more document, with no target
                    row.append(L - sum(row))
            if mask is not None:  # laid end to end, padding sits between rows: its labels go, the mask cannot
                labels[~mask] = IGNORE_INDEX
            ids, labels, mask = ids.reshape(1, -1), labels.reshape(1, -1), None
            seq_lens = [n for row in rows for n in row]
        pad = (-ids.shape[1]) % self.unit
        if pad:
            ids = F.pad(ids, (0, pad), value=self.pad_token_id)
            labels = F.pad(labels, (0, pad), value=IGNORE_INDEX)
            if seq_lens is not None:
                seq_lens.append(pad)
            else:
                mask = F.pad(torch.ones_like(ids[:, :-pad], dtype=torch.bool) if mask is None else mask, (0, pad),
                             value=False)
        full: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if mask is not None and not bool(mask.all()):
            full["attention_mask"] = mask
        if seq_lens is not None:
            full["seq_lens"] = seq_lens
        return full

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if self.sp_size > 1 and self.reduction is None:
            raise ValueError(NO_REDUCTION)
        full = self.full_batch(features)
        out: dict[str, Any] = dict(shard_batch(full, self.group, self.layout))
        if "cu_seqlens" in out:
            out[BOUNDS] = host_bounds(out["cu_seqlens"])
        out[FINGERPRINT] = torch.tensor([_fingerprint(full)], dtype=torch.int64)
        return out


class SPBatchOrder(Sampler[int]):
    """The sample order of ``inner`` cut into batches of ``batch_size``, each batch yielded ``sp_size`` times in a
    row, so that accelerate's round-robin dealing of batches over the W = sp_size x dp_size ranks gives every rank
    of an SP group (consecutive ranks) the same batch and every DP rank a different one.

    The last incomplete batch is completed from the start of the order (or dropped with ``drop_last``), and the
    number of batches is made a multiple of ``dp_size`` the same way, so accelerate never pads (it would pad
    across SP groups). ``shuffle_seed``: a fresh permutation per epoch (``set_epoch``), the same on every rank.
    """

    def __init__(self, inner: Sampler, batch_size: int, sp_size: int, dp_size: int, *,
                 shuffle_seed: int | None = None, drop_last: bool = False):
        self.inner, self.batch_size, self.sp_size, self.dp_size = inner, batch_size, sp_size, dp_size
        self.shuffle_seed, self.drop_last, self.epoch = shuffle_seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        if self.shuffle_seed is not None:
            rng = torch.Generator().manual_seed(self.shuffle_seed + self.epoch)
            order = torch.randperm(len(self.inner), generator=rng).tolist()
        else:
            order = list(iter(self.inner))
        if not order:
            return []
        B, D = self.batch_size, self.dp_size
        out = [order[i:i + B] for i in range(0, len(order), B)]
        if len(out[-1]) < B:
            if self.drop_last:
                out.pop()
            else:
                out[-1] += [order[i % len(order)] for i in range(B - len(out[-1]))]
        if len(out) % D:
            out = out[: len(out) - len(out) % D] if self.drop_last else out + [out[i % len(out)]
                                                                                for i in range(-len(out) % D)]
        return out

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            for _ in range(self.sp_size):
                yield from batch

    def __len__(self) -> int:
        n, B, D = len(self.inner), self.batch_size, self.dp_size
        count = n // B + (0 if self.drop_last or n % B == 0 else 1)
        count = count - count % D if self.drop_last else count + (-count % D)
        return count * B * self.sp_size


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mismatch(fingerprints: torch.Tensor, group) -> torch.Tensor:
    """1 if the SP ranks of this group hold different batches, else 0 (int64, on the fingerprints' device):
    one MAX all-reduce of 2 x M int64 over the SP group. The caller sums the flag over the world before
    raising, so that every rank of every group stops together (none waits in a collective)."""
    if group_size(group) == 1:
        return torch.zeros((), dtype=torch.int64, device=fingerprints.device)
    both = torch.cat([fingerprints, -fingerprints])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    m = fingerprints.numel()
    return (both[:m] != -both[m:]).any().long()


MISMATCH = (
    "the ranks of an SP group received different batches (accelerate's data order is not the one SPBatchOrder "
    "sets: dispatch_batches, split_batches, a custom sampler or dataloader?): keep SeqparTrainer's sampler and "
    "leave accelerator_config's dispatch_batches and split_batches unset")


def _patch_of(model: torch.nn.Module):
    from seqpar.models.patch import patch_of

    patch = patch_of(model)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched by seqpar: call seqpar.models.patch_model(model, "
                         "attention, parallel) before building the trainer")
    return patch


def _refuse_parallelism_config(config: Any) -> None:
    if config is None:
        return
    for name, owner in (("sp_size", "DeepSpeed ALST (sp_backend='deepspeed')"),
                        ("cp_size", "torch context parallel (cp_backend='torch', FSDP2)")):
        if (getattr(config, name, 1) or 1) > 1:
            raise ValueError(
                f"parallelism_config.{name}={getattr(config, name)} hands attention and batches to {owner}, which "
                "would replace seqpar's: leave it 1 (seqpar's SP group is the one the model was patched with)")


class SeqparTrainerMixin:
    """The seqpar overrides of a ``transformers.Trainer`` subclass (module docstring: which hook and why).

    Extra keyword: ``loss_chunk_size`` (int): fuse the LM head with the loss over tiles of that many tokens
    (``seqpar.models.sp_fused_linear_cross_entropy``; no ``[B, L/N, V]`` logits), None: full logits.
    """

    loss_is_scaled_for_ga = True  # compute_loss already divides by the step's target tokens (transformers >= 5)

    def __init__(self, *args: Any, loss_chunk_size: int | None = None, **kwargs: Any):
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        _refuse_parallelism_config(getattr(given, "parallelism_config", None))
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func would replace seqpar's SP loss (token-weighted over SP ranks and "
                             "accumulation): leave it None, or subclass and use seqpar.models.causal_lm_loss")
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("compute_metrics would see logits sharded over the SP ranks: leave it None (eval_loss "
                             "is the exact token mean) or evaluate without SP")
        super().__init__(*args, **kwargs)
        _refuse_parallelism_config(getattr(self.accelerator, "parallelism_config", None))
        if self.args.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor}: seqpar's SP loss is plain "
                             "cross-entropy; set it to 0")
        from seqpar.attention.registry import get_spec

        patch = _patch_of(self.model)
        self.sp_group, self.sp_size = patch.group, group_size(patch.group)
        world = self.args.world_size
        if world % self.sp_size:
            raise ValueError(f"the Trainer runs {world} processes, not a multiple of the model's SP size "
                             f"{self.sp_size}: launch a multiple of {self.sp_size} processes")
        self.dp_size = world // self.sp_size
        self.loss_chunk_size = loss_chunk_size
        self.model_accepts_loss_kwargs = True  # older transformers: a loss normalised by num_items_in_batch
        pad = getattr(self.processing_class, "pad_token_id", None)
        self.data_collator = SPDataCollator(patch.group, patch.layout, collator=self._sp_inner_collator(kwargs),
                                            pad_token_id=0 if pad is None else pad,
                                            documents=get_spec(patch.attention).varlen)
        self.data_collator.reduction = "token-weighted, W/T-scaled"  # compute_loss + _get_num_items_in_batch below
        self._sp_eval: torch.Tensor | None = None
        self._sp_checked = False

    def _sp_inner_collator(self, kwargs: Mapping[str, Any]):
        """The collator making full batches: the user's, or None for ``pad_and_stack`` (HF's default padding
        collator cannot pad labels)."""
        return kwargs.get("data_collator")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *(k for k in DOC_KEYS if k not in self._signature_columns)]

    # --- the sample order --------------------------------------------------------------------------------------

    def _refuse_iterable(self, dataset: Any, which: str) -> None:
        if isinstance(dataset, torch.utils.data.IterableDataset) or (dataset is not None and
                                                                    not hasattr(dataset, "__len__")):
            raise ValueError(f"the {which} dataset is iterable: accelerate splits it over all ranks, so the SP ranks "
                             "of a group would get different sequences; use a map-style dataset (datasets.Dataset "
                             "or a list)")

    def get_train_dataloader(self):
        self._refuse_iterable(self.train_dataset, "train")
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        chosen = self.eval_dataset if eval_dataset is None else eval_dataset
        self._refuse_iterable(self.eval_dataset[chosen] if isinstance(chosen, str) else chosen, "eval")
        return super().get_eval_dataloader(eval_dataset)

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Sampler:
        from transformers.trainer_pt_utils import BatchRebalanceSampler

        inner = super()._get_train_sampler(*args, **kwargs)
        if isinstance(inner, BatchRebalanceSampler):
            raise ValueError("train_sampling_strategy='batch_rebalance' deals batches per rank itself, so SP ranks "
                             "would differ: use 'random', 'sequential' or 'group_by_length'")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SPBatchOrder(inner, self._train_batch_size, self.sp_size, self.dp_size,
                            shuffle_seed=seed if isinstance(inner, RandomSampler) else None,
                            drop_last=self.args.dataloader_drop_last)

    def _get_eval_sampler(self, eval_dataset: Any) -> Sampler:
        inner = super()._get_eval_sampler(eval_dataset)
        n, b = len(eval_dataset), self.args.eval_batch_size
        if n % (b * self.dp_size):
            raise ValueError(
                f"the eval set has {n} samples, not a multiple of per_device_eval_batch_size x dp_size = {b} x "
                f"{self.dp_size}: accelerate would repeat samples to even the ranks and eval_loss would count them "
                f"twice; trim or extend it to a multiple of {b * self.dp_size}")
        return SPBatchOrder(SequentialSampler(eval_dataset) if inner is None else inner, b, self.sp_size,
                            self.dp_size)

    # --- the loss and the gradient reduction -------------------------------------------------------------------

    def _get_num_items_in_batch(self, batches: list, device: torch.device):
        """T for the micro-batches of one optimizer step (``get_batch_samples`` asks): their target tokens over
        every rank. It replaces the Trainer's count, which assumes unshifted labels (ours are shifted) and
        gathers over all ranks once more."""
        if not batches:
            return None
        if any(FINGERPRINT not in b for b in batches):
            raise ValueError("the batches do not come from SPDataCollator (was trainer.data_collator replaced?): "
                             "SeqparTrainer needs its sharded batches; pass your collator as data_collator=")
        count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(device)
        flag = _mismatch(torch.cat([b[FINGERPRINT] for b in batches]).to(device), self.sp_group)
        count, flag = world_sum(torch.stack([count, flag]))  # one all-reduce: T and any group's mismatch
        if flag:
            raise ValueError(MISMATCH)
        return count

    def _check_reduction(self, model: torch.nn.Module) -> None:
        """Our loss assumes the gradients are AVERAGED over all W ranks, SP ranks included."""
        world = _world_size()
        if self._sp_checked or world == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            ranks = dist.get_world_size(model.process_group)
        elif hasattr(model, "dp_world_size"):  # a DeepSpeed engine (no mpu: its DP group is the world)
            ranks = model.dp_world_size
        elif hasattr(model, "reshard") or type(model).__name__.startswith("FullyShardedDataParallel"):
            ranks = world  # FSDP / FSDP2 over the accelerator's mesh of all ranks
        else:
            raise ValueError(f"the model is not wrapped by DDP, DeepSpeed or FSDP over the {world} ranks: nothing "
                             "would sum its gradients over the SP ranks; let the Trainer wrap it (no "
                             "place_model_on_device tricks) or reduce them yourself")
        if ranks != world:
            raise ValueError(f"the gradients are averaged over {ranks} ranks, not the {world} the SP loss is scaled "
                             "for: wrap the model over all ranks (SP and DP) as the Trainer does by default")
        self._sp_checked = True

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        from seqpar.models import causal_lm_loss

        inputs = dict(inputs)
        labels, fingerprint, bounds = inputs.pop("labels"), inputs.pop(FINGERPRINT, None), inputs.pop(BOUNDS, None)
        if bounds is not None and "cu_seqlens" in inputs:  # no layer reads the boundaries back from the device
            remember_bounds(inputs["cu_seqlens"], bounds)
        if fingerprint is None:
            raise ValueError("the batch does not come from SPDataCollator: SeqparTrainer needs its sharded batches")
        local = causal_lm_loss(model, inputs, labels, self.sp_group, chunk_size=self.loss_chunk_size,
                               reduction="sum")
        if self.model.training:
            if num_items_in_batch is None:
                raise ValueError("compute_loss was called in training without the step's target count: keep "
                                 "SeqparTrainer's get_batch_samples and training_step")
            self._check_reduction(model)
            total = torch.as_tensor(num_items_in_batch, device=local.device).double().clamp(min=1)
            loss = local * (_world_size() / total).to(local.dtype)  # DDP's average over W ranks -> sum S / T
        else:
            if world_sum(_mismatch(fingerprint.to(labels.device), self.sp_group)):
                raise ValueError(MISMATCH)
            count = (labels != IGNORE_INDEX).sum()
            if self._sp_eval is not None:
                self._sp_eval += torch.stack([local.detach().double(), count.double()]).to(self._sp_eval.device)
            loss = sp_global_mean(local, count, self.sp_group)  # this batch's token mean, the same on SP ranks
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop, then ``{prefix}_loss`` set to the token mean over the whole eval set."""
        self._sp_eval = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                          metric_key_prefix)
            total, count = host_read(world_sum(self._sp_eval), "eval_loss")
        finally:
            self._sp_eval = None
        if count > 0:
            out.metrics[f"{metric_key_prefix}_loss"] = total / count
        return out


class SeqparTrainer(SeqparTrainerMixin, Trainer):
    """``transformers.Trainer`` with seqpar's sequence parallelism (this module's docstring; docs/trainers.md)."""


def _sft_trainer_class():
    try:
        from trl import SFTTrainer
    except ImportError as err:
        raise ImportError("SeqparSFTTrainer needs TRL: pip install trl (seqpar's dev extra installs it); "
                          "SeqparTrainer works without it") from err

    class SeqparSFTTrainer(SeqparTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` with seqpar's sequence parallelism: TRL prepares the data (tokenising, packing,
        completion/assistant masks) and its collator makes the full batch (padding-free: documents from
        ``position_ids``), seqpar shards it and computes the loss. TRL's entropy/accuracy metrics are not logged
        (they would be shard-local)."""

        def _sp_inner_collator(self, kwargs: Mapping[str, Any]):
            return self.data_collator  # TRL's: it reads TRL's dataset columns

    SeqparSFTTrainer.__module__ = __name__
    return SeqparSFTTrainer


def __getattr__(name: str) -> Any:
    """``SeqparSFTTrainer`` is built on first use: importing this module does not need TRL."""
    if name != "SeqparSFTTrainer":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _sft_trainer_class()
    globals()[name] = cls
    return cls


__all__ = ["SPBatchOrder", "SPDataCollator", "SeqparTrainer", "SeqparTrainerMixin", "documents_from_positions",
           "pad_and_stack"]  # and SeqparSFTTrainer, built on first access (TRL is optional)
