"""Recipe checks that need more than types: impossible combinations, caught before any process group starts.

Each check appends a message naming the dotted key, the value and what would be valid; ``validate`` raises
one RecipeError listing them all, so a user fixes a recipe in one round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seqpar.attention.checks import check_head_split
from seqpar.attention.registry import ATTENTIONS, head_split_degree, resolve_layout
from seqpar.models.families import (
    family_of,
    hybrid_model_types,
    layout_for,
    linear_primitive_refusal,
    refusal_for_config,
    shortest_window,
)
from seqpar.sharding import ShardingError, check_divisible
from seqpar.train.memory import check_memory
from seqpar.train.preemption import check_signals
from seqpar.train.recipe import LINEAR_MODEL_TYPES, SOFTMAX_MODEL_TYPES, Recipe, RecipeError, given_sections

TRAINABLE_EXTRAS = {"embed": "embed_tokens", "norm": "norm", "lm_head": "lm_head"}
BYTE_VOCAB = 259  # 256 bytes + <pad>, <s>, </s> (seqpar.train.data.byte_tokenizer)


def _positive(errors: list[str], key: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        errors.append(f"{key}={value!r}: must be >= {minimum}")


def _check_numbers(r: Recipe, errors: list[str]) -> None:
    t = r.trainer
    for key, value in (("trainer.max_steps", t.max_steps), ("trainer.micro_batch", t.micro_batch),
                       ("trainer.grad_accum", t.grad_accum), ("data.seq_len", r.data.seq_len),
                       ("attention.sp_size", r.attention.sp_size), ("checkpoint.keep", r.checkpoint.keep),
                       ("logging.log_every", r.logging.log_every), ("launch.nnodes", r.launch.nnodes),
                       ("launch.nproc_per_node", r.launch.nproc_per_node),
                       ("launch.rendezvous_timeout", r.launch.rendezvous_timeout)):
        _positive(errors, key, value)
    for key, value in (("trainer.warmup_steps", t.warmup_steps), ("checkpoint.every", r.checkpoint.every),
                       ("eval.every", r.eval.every), ("trainer.max_grad_norm", t.max_grad_norm),
                       ("trainer.weight_decay", t.weight_decay)):
        _positive(errors, key, value, 0)
    if not t.lr > 0:
        errors.append(f"trainer.lr={t.lr!r}: must be > 0 (LongLoRA uses 2e-5)")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        errors.append(f"trainer.betas={t.betas!r}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if r.deepspeed.offload != "none" and r.deepspeed.zero_stage == 0:
        errors.append(f"deepspeed.offload={r.deepspeed.offload!r} needs ZeRO: set deepspeed.zero_stage to 2 or 3 "
                      "or deepspeed.offload=none")


def _check_engine(r: Recipe, world_size: int | None, errors: list[str], cuda: bool | None) -> None:
    """The engine's own section, and only that one: a ``deepspeed:`` section under ``engine: fsdp2`` (or the
    reverse) would be silently ignored, and a ZeRO stage the user asked for would not be what ran."""
    given, f = given_sections(r), r.fsdp2
    if r.engine == "fsdp2" and "deepspeed" in given:
        errors.append(f"engine=fsdp2 with a deepspeed section (deepspeed.zero_stage={r.deepspeed.zero_stage}): FSDP2 "
                      "shards parameters, gradients and optimizer states over all dp x sp ranks itself, so a ZeRO "
                      "stage does not apply: remove the deepspeed section (fsdp2.reshard_after_forward=false is the "
                      "ZeRO-2-like setting, fsdp2.offload=cpu the offload) or set engine=deepspeed")
    if r.engine == "deepspeed" and "fsdp2" in given:
        errors.append("fsdp2 section with engine=deepspeed: its settings would be ignored: set engine=fsdp2, or "
                      "remove the fsdp2 section")
    if r.engine != "fsdp2":
        return
    sp = r.attention.sp_size
    if f.dp_size is not None and f.dp_size < 1:
        errors.append(f"fsdp2.dp_size={f.dp_size}: must be >= 1 (or null: world size / attention.sp_size)")
    elif f.dp_size is not None and world_size is not None and sp >= 1 and f.dp_size * sp != world_size:
        fits = f"fsdp2.dp_size={world_size // sp}" if world_size % sp == 0 else "a world divisible by attention.sp_size"
        errors.append(f"fsdp2.dp_size={f.dp_size} x attention.sp_size={sp} = {f.dp_size * sp} ranks, but the world "
                      f"has {world_size}: the (dp, sp) mesh must cover every rank once: use {fits}, fsdp2.dp_size=null "
                      f"(world / sp_size), or launch {f.dp_size * sp} processes")
    if f.offload == "cpu" and (r.launch.device == "cpu" or cuda is False):
        errors.append("fsdp2.offload=cpu moves sharded parameters, gradients and optimizer states from the GPU to "
                      "host memory, but this run has no GPU (launch.device=cpu or none visible): set "
                      "fsdp2.offload=none")


def _check_attention(r: Recipe, config: Any, world_size: int | None, errors: list[str]) -> None:
    a, seq_len = r.attention, r.data.seq_len
    if world_size is not None and a.sp_size >= 1 and world_size % a.sp_size:
        ok = [d for d in range(1, world_size + 1) if world_size % d == 0]
        errors.append(f"attention.sp_size={a.sp_size} does not divide the world size {world_size}: use one of {ok} "
                      f"or launch a multiple of {a.sp_size} processes")
    model_type = getattr(config, "model_type", None)
    if a.sp_size >= 1 and seq_len >= 1:
        try:
            layout = resolve_layout(a.name, layout_for(model_type, a.layout))
        except ValueError as err:
            errors.append(f"attention.layout={a.layout!r}: {err}")
        else:
            try:
                check_divisible(seq_len, a.sp_size, layout, name="data.seq_len")
            except ShardingError as err:
                # the sharding error's own suggestions know only the layout: suggest what the attention accepts
                errors.append(f"{str(err).split('; nearest valid lengths')[0]}; {_suggest_lengths(r, layout)} "
                              f"[attention.name={a.name}, attention.sp_size={a.sp_size}]")
    heads = getattr(config, "num_attention_heads", None)
    degree = head_split_degree(a.name, group=a.sp_size, ulysses_group=a.ulysses_degree)  # the registry's rule
    if a.name == "usp" and degree is not None and (degree < 1 or a.sp_size % degree):
        errors.append(f"attention.ulysses_degree={degree} must divide attention.sp_size={a.sp_size}")
    elif degree and heads:
        try:
            check_head_split(heads, degree, what="attention.sp_size" if a.name == "ulysses" else "ulysses_degree")
        except ValueError as err:
            errors.append(f"attention.name={a.name!r} with {heads} heads (num_attention_heads): {err}, or use "
                          "attention.name=ring")
    if a.s2_wrap and a.name != "s2":
        errors.append(f"attention.s2_wrap=true with attention.name={a.name!r}: only s2 wraps (SF-Attn shifts back "
                      "by definition); set attention.s2_wrap=false")
    if a.name in ("s2", "sf") and not (a.sp_size >= 1 and seq_len % a.sp_size):  # else: the split error above
        errors.extend(_group_problems(r, seq_len))
    if config is not None and seq_len >= 1:
        _check_window(a.name, config, seq_len, errors)
    linear = ATTENTIONS[a.name].models == "linear"
    fits = [n for n, s in ATTENTIONS.items() if s.models != "linear"]
    if linear and (why := linear_primitive_refusal(model_type, tuple(fits))):
        errors.append(f"attention.name={a.name!r} with {why}")
    elif linear and model_type not in LINEAR_MODEL_TYPES:
        errors.append(f"attention.name={a.name!r} needs a linear-attention model (model_type in {LINEAR_MODEL_TYPES}),"
                      f" got model_type={model_type!r}: use one of {fits} for softmax models")
    if model_type in LINEAR_MODEL_TYPES and not linear:
        fits = [n for n, s in ATTENTIONS.items() if s.models == "linear"]
        errors.append(f"attention.name={a.name!r}: model_type={model_type!r} is a linear-attention model; "
                      f"use attention.name in {fits} (the softmax layers of a hybrid use all-gather attention)")


def _check_window(name: str, config: Any, seq_len: int, errors: list[str]) -> None:
    """Learned sinks, and a sliding window (or Llama 4 chunk) shorter than data.seq_len, need a primitive that
    applies them (``seqpar.models.patch`` refuses the same at the first layer call otherwise)."""
    model_type = getattr(config, "model_type", None)
    fam = family_of(model_type)
    if fam is not None and fam.sinks and "sinks" not in ATTENTIONS[name].options:
        takes = [n for n, s in ATTENTIONS.items() if "sinks" in s.options]
        errors.append(f"attention.name={name!r} with model_type={model_type!r}: its layers add learned attention "
                      f"sinks (s_aux), which {name} does not implement: use attention.name in {takes}")
    found = shortest_window(config)
    if found is None or found[1] >= seq_len or ATTENTIONS[name].models == "linear":
        return
    kind, size = found
    if kind == "window" and "window" not in ATTENTIONS[name].options:
        takes = [n for n, s in ATTENTIONS.items() if "window" in s.options]
        errors.append(f"attention.name={name!r} with model_type={model_type!r}: its sliding window of {size} tokens "
                      f"is shorter than data.seq_len={seq_len} and {name} does not implement windows (it would attend "
                      f"beyond them): use attention.name in {takes}")
    elif kind == "chunk" and not ATTENTIONS[name].varlen:
        takes = [n for n, s in ATTENTIONS.items() if s.varlen]
        errors.append(f"attention.name={name!r} with model_type={model_type!r}: its attention chunks of {size} tokens "
                      f"are shorter than data.seq_len={seq_len} and seqpar runs them as packed documents, which "
                      f"{name} does not take: use attention.name in {takes}")


def _group_problems(r: Recipe, seq_len: int) -> list[str]:
    """S2/SF group rules at ``seq_len`` (the primitive's: seqpar.attention.checks.check_shift_args)."""
    from seqpar.attention.checks import max_sink_tokens

    a, out = r.attention, []
    g, n = a.group_size_ratio * seq_len, seq_len // max(1, a.sp_size)
    if not 0 < a.group_size_ratio <= 1 or g != int(g) or int(g) % 2 or seq_len % int(g):
        out.append(f"attention.group_size_ratio={a.group_size_ratio}: the S2 group size ratio x data.seq_len"
                   f" = {g:g} must be an even whole number dividing data.seq_len={seq_len} (LongLoRA uses 0.25)")
    elif a.sp_size >= 1 and n % int(g):
        out.append(f"attention.group_size_ratio={a.group_size_ratio}: the S2 group of {int(g)} tokens must divide "
                   f"each rank's {n} tokens (data.seq_len / attention.sp_size) so that unshifted groups stay on one "
                   f"rank: use attention.sp_size in {_group_sp_sizes(a.group_size_ratio)}, or a smaller ratio")
    if a.name == "sf" and not 0 <= a.num_sink_tokens <= max_sink_tokens(n):
        out.append(f"attention.num_sink_tokens={a.num_sink_tokens}: must be in [0, {max_sink_tokens(n)}] (the "
                   "sink tokens live on the first rank's data.seq_len / attention.sp_size tokens)")
    return out


def _group_sp_sizes(ratio: float) -> list[int]:
    """SP sizes whose per-rank share holds whole S2 groups: 1/sp a multiple of the ratio."""
    return [n for n in range(1, 65) if ratio * n <= 1 and abs(round(1 / (ratio * n)) * ratio * n - 1) < 1e-9]


def _suggest_lengths(r: Recipe, layout: str, span: int = 1 << 16) -> str:
    """The nearest data.seq_len below and above that pass every length rule of the chosen attention."""
    a, seq_len = r.attention, r.data.seq_len
    unit = a.sp_size * (2 if layout == "zigzag" else 1)

    def ok(n: int) -> bool:
        return n > 0 and n % unit == 0 and not (a.name in ("s2", "sf") and _group_problems(r, n))

    below = next((n for n in range(seq_len - seq_len % unit, max(0, seq_len - span), -unit) if ok(n)), None)
    above = next((n for n in range(seq_len - seq_len % unit + unit, seq_len + span, unit) if ok(n)), None)
    found = [n for n in (below, above) if n is not None]
    if found:
        return f"nearest lengths valid for attention.name={a.name} with sp_size {a.sp_size}: {found}"
    return (f"no data.seq_len works for attention.name={a.name} with sp_size {a.sp_size} and group_size_ratio "
            f"{a.group_size_ratio}: use attention.sp_size in {_group_sp_sizes(a.group_size_ratio)}")


def _check_lora(r: Recipe, leaf_names: set[str] | None, errors: list[str]) -> None:
    lo = r.lora
    if not lo.enabled:
        return
    if lo.r < 1:
        errors.append(f"lora.r={lo.r}: must be >= 1 (LongLoRA uses 8)")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout={lo.dropout}: must be in [0, 1)")
    if not lo.targets:
        errors.append("lora.targets=[]: name the projections to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]")
    bad = [x for x in lo.trainable if x not in TRAINABLE_EXTRAS]
    if bad:
        errors.append(f"lora.trainable={lo.trainable}: {bad} unknown; valid extras: {sorted(TRAINABLE_EXTRAS)}")
    if leaf_names is not None:
        missing = [t for t in lo.targets if t not in leaf_names]
        if missing:
            linear = sorted(n for n in leaf_names if n.endswith("_proj"))
            errors.append(f"lora.targets={lo.targets}: {missing} not in the model; its projections are {linear}")


def _check_model_data(r: Recipe, config: Any, errors: list[str]) -> None:
    m, d, rs = r.model, r.data, r.rope_scaling
    if (m.path is None) == (m.from_config is None):
        errors.append(f"model: set exactly one of model.path (a local folder) or model.from_config "
                      f"(got path={m.path!r}, from_config={'set' if m.from_config else None})")
    model_type = getattr(config, "model_type", None)
    refused = None if config is None else refusal_for_config(config)  # the model-family table
    if refused is not None:
        errors.append(f"model: {refused}")
    elif config is not None and model_type not in (trained := SOFTMAX_MODEL_TYPES + LINEAR_MODEL_TYPES
                                                   + hybrid_model_types()):
        errors.append(f"model.model_type={model_type!r} is not supported: use one of {trained}")
    if m.from_config is not None and d.tokenizer is None and getattr(config, "vocab_size", BYTE_VOCAB) < BYTE_VOCAB:
        errors.append(f"model.from_config.vocab_size={config.vocab_size}: the built-in byte tokenizer needs >= "
                      f"{BYTE_VOCAB}; raise it or set data.tokenizer")
    if d.source == "files" and not d.files:
        errors.append("data.files=[]: data.source=files needs local jsonl/json/text/parquet files")
    if d.source == "sft":
        _check_sft(r, errors)
    if not 0 <= d.eval_fraction < 1:
        errors.append(f"data.eval_fraction={d.eval_fraction}: must be in [0, 1), e.g. 0.05")
    if r.eval.every and not d.eval_files and not d.eval_fraction > 0:
        errors.append(f"eval.every={r.eval.every} needs a held-out split (eval_loss is never measured on training "
                      "samples): set data.eval_fraction=0.05 or data.eval_files=[...], or eval.every=0")
    if rs.type is None and rs.factor is not None:
        errors.append(f"rope_scaling.factor={rs.factor!r} without rope_scaling.type: set type (e.g. linear)")
    if isinstance(rs.factor, str) and rs.factor != "auto":
        errors.append(f"rope_scaling.factor={rs.factor!r}: a number >= 1 or 'auto'")
    elif isinstance(rs.factor, float) and rs.factor < 1:
        errors.append(f"rope_scaling.factor={rs.factor}: must be >= 1 (it stretches the original context)")


def _check_sft(r: Recipe, errors: list[str]) -> None:
    """SFT data: a source, files that can hold conversations, and packing only where documents stay apart."""
    from seqpar.attention.registry import get_spec

    a, d, s = r.attention, r.data, r.data.sft
    if s.make is None and not d.files:
        errors.append("data.files=[]: data.source=sft needs local jsonl/json/parquet files of Alpaca rows "
                      "(instruction, input, output) or chat messages, or data.sft.make=stdlib-qa for the quick set")
    if s.make is not None and d.files:
        errors.append(f"data.sft.make={s.make} and data.files={d.files}: choose one (set data.sft.make=null to read "
                      "the files)")
    if s.make is not None and s.num_conversations < 1:
        errors.append(f"data.sft.num_conversations={s.num_conversations}: must be >= 1")
    if d.format == "text":
        errors.append("data.format=text with data.source=sft: conversations come in jsonl, json or parquet files")
    if d.pack and a.name in ATTENTIONS and not get_spec(a.name).varlen:
        errors.append(f"data.pack=true with attention.name={a.name}: {a.name} takes no document boundaries, so packed "
                      "conversations would attend to each other; set data.pack=false (one conversation per sequence, "
                      "right-padded, as LongLoRA's SFT) or use attention.name in "
                      f"{[n for n, x in ATTENTIONS.items() if x.varlen]}")


def _check_tiled_mlp(r: Recipe, classes: set[str] | None, errors: list[str]) -> None:
    """``memory.tiled_mlp`` needs an MLP ``tile_mlp`` knows (a run would stop at start-up otherwise)."""
    from seqpar.models.tiled_mlp import MLP_CLASSES

    if r.memory.tiled_mlp and classes is not None and not classes & set(MLP_CLASSES):
        errors.append(f"memory.tiled_mlp=true: the model has no MLP tile_mlp supports ({', '.join(MLP_CLASSES)}; "
                      "MoE and hybrid MLPs are not tiled): set memory.tiled_mlp=false")


def validate(recipe: Recipe, world_size: int | None = None, *, check_paths: bool = False) -> Any:
    """Raise RecipeError listing every problem; return the model config (or facts) the checks used."""
    from seqpar.train.model import base_config, module_class_names, module_leaf_names

    errors: list[str] = []
    config = None
    try:
        config = base_config(recipe)
    except RecipeError as err:
        errors.append(str(err))
    _check_numbers(recipe, errors)
    check_signals(recipe.checkpoint.on_signal, errors)
    _check_model_data(recipe, config, errors)
    if check_paths:  # what training reads on this machine (--dry-run plans for another one)
        _check_model_folder(recipe, config, errors)
        _check_data_files(recipe, errors)
        _check_device(recipe, errors)
    _check_attention(recipe, config, world_size, errors)
    _check_engine(recipe, world_size, errors, _cuda() if check_paths else None)
    check_memory(recipe, errors, cuda=_cuda() if check_paths else None)
    leaves = module_leaf_names(config) if config is not None and not errors else None
    _check_lora(recipe, leaves, errors)
    _check_tiled_mlp(recipe, module_class_names(config) if leaves is not None else None, errors)
    if errors:
        raise RecipeError(f"invalid recipe ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                          + "; ".join(errors))
    return config


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What a valid recipe does that a user may not expect, said once per run (rank 0) by the trainer."""
    from seqpar.attention.registry import get_spec

    a, d = recipe.attention, recipe.data
    if d.source == "files" and d.pack and not get_spec(a.name).varlen:
        return [f"attention.name={a.name} with data.pack=true: {a.name} takes no document boundaries, so packed "
                f"documents attend to each other (ring, allgather and full keep them apart); a comparison with "
                f"those attentions is not like for like: set data.pack=false for one document per row"]
    return []


def _check_model_folder(r: Recipe, config: Any, errors: list[str]) -> None:
    """The files training will read: weights present and safe to load, a tokenizer that fits the model."""
    m, d = r.model, r.data
    if m.from_config is None and m.path and not Path(m.path).is_dir():
        if m.config:  # base_config fell back to the recipe's facts (fine for --dry-run, not for training)
            errors.append(f"model.path={m.path!r} does not exist: download the model to that local folder "
                          "(no hub access is attempted)")
        return
    if m.from_config is None and m.path:
        folder = Path(m.path)
        safe, pickles = sorted(folder.glob("*.safetensors")), sorted(folder.glob("pytorch_model*.bin"))
        if not safe and not pickles:
            errors.append(f"model.path={m.path!r} has a config but no weights (no *.safetensors or "
                          "pytorch_model*.bin): copy the weight files into it (save_pretrained writes them)")
        for f in pickles if not safe else []:  # with safetensors present the .bin files are never read
            from seqpar.train.checkpoint import unsafe_globals

            try:
                bad = unsafe_globals(f)
            except (RuntimeError, ValueError, OSError) as err:
                bad = [f"unreadable: {str(err).splitlines()[0][:80]}"]
            if bad:
                errors.append(f"model.path={m.path!r}: {f.name} refused: unpickling it would import {bad}: use "
                              "safetensors weights from a trusted copy")
    tok_dir = d.tokenizer or (m.path if m.from_config is None else None)
    vocab = getattr(config, "vocab_size", None)
    if tok_dir and Path(tok_dir).is_dir() and vocab:
        from transformers import AutoTokenizer

        try:
            n = len(AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=m.trust_remote_code))
        except Exception as err:  # any failure to read the folder is the user's to fix
            errors.append(f"data.tokenizer={tok_dir!r} cannot be loaded ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]}): point it at a folder with tokenizer files")
            return
        if n > vocab:
            errors.append(f"the tokenizer at {tok_dir!r} has {n} tokens but the model has vocab_size={vocab}: use "
                          "the model's own tokenizer (data.tokenizer), or grow the model first "
                          "(model.resize_token_embeddings, then save_pretrained)")


def _check_data_files(r: Recipe, errors: list[str]) -> None:
    d = r.data
    named = [(f"data.files[{i}]", f) for i, f in enumerate(d.files if d.source in ("files", "sft") else [])]
    for key, f in named + [(f"data.eval_files[{i}]", f) for i, f in enumerate(d.eval_files)]:
        p = Path(f)
        if not p.exists():
            errors.append(f"{key}={f!r} does not exist: give a local file (no hub downloads)")
        elif p.is_file() and p.stat().st_size == 0:
            errors.append(f"{key}={f!r} is empty: give a file with documents")
        elif p.is_file() and (d.format or p.suffix.lstrip(".")) != "parquet":
            bad = _first_non_utf8(p)
            if bad is not None:
                errors.append(f"{key}={f!r} is not UTF-8 text (byte {bad}): re-encode it, e.g. "
                              f"iconv -f latin1 -t utf-8")


def _first_non_utf8(path: Path, chunk: int = 1 << 20) -> int | None:
    """Offset of the first byte that is not UTF-8, or None (read in chunks: data files can be large)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                return offset + err.start
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        return offset + err.start
    return None


def _check_device(r: Recipe, errors: list[str]) -> None:
    import torch

    if r.launch.device == "cuda" and not torch.cuda.is_available():
        errors.append("launch.device='cuda' but no CUDA GPU is visible on this machine: set launch.device=cpu "
                      "(gloo) or run on a GPU node")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
