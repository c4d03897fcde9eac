"""Recipe schema: dataclasses are the schema, a YAML file fills them, ``dotted.key=value`` overrides win.

    recipe = load_recipe("recipes/quickstart-cpu.yaml", ["trainer.max_steps=20", "attention.sp_size=1"])
    validate(recipe, world_size=2)          # raises RecipeError naming every bad key, before any rendezvous

Every check runs before a process group starts, so a bad recipe fails in a second on every rank with the
key's dotted path, the value it had and what would be valid, instead of after minutes of model loading.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from seqpar.attention.registry import NAMES as ATTENTIONS

# softmax model types seqpar train builds and trains; qwen3, gemma3_text and gpt_oss carry sliding windows
# (and gpt_oss learned sinks), applied per layer by patch_model
SOFTMAX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_oss")
LINEAR_MODEL_TYPES = ("linear_llama",)  # seqpar.models.linear_llama; hybrids set layer_types
# Names other tools use for our keys, suggested when difflib finds nothing close.
ALIASES = {"learning_rate": "lr", "scheduler": "schedule", "lr_scheduler": "schedule", "warmup": "warmup_steps",
           "batch_size": "micro_batch", "gradient_accumulation_steps": "grad_accum", "stage": "zero_stage",
           "rank": "r", "lora_alpha": "alpha", "target_modules": "targets", "max_length": "seq_len",
           "seq_length": "seq_len", "sequence_length": "seq_len", "steps": "max_steps", "precision": "dtype"}


class RecipeError(ValueError):
    """A recipe that cannot run: every message names the dotted key, its value and the fix."""


@dataclass
class ModelSection:
    path: str | None = None  # local Hugging Face folder
    from_config: dict | None = None  # a tiny model built on the spot: {model_type: llama, hidden_size: 64, ...}
    config: dict = field(default_factory=dict)  # config facts used by --dry-run when `path` is not on disk
    trust_remote_code: bool = False


@dataclass
class AttentionSection:
    name: Literal[ATTENTIONS] = "full"  # seqpar.attention.registry
    sp_size: int = 1
    layout: Literal["zigzag", "contiguous"] | None = None  # None: the primitive's default (zigzag for ring)
    group_size_ratio: float = 0.25  # s2/sf: group G = ratio x global sequence length (LongLoRA uses 1/4)
    num_sink_tokens: int = 4  # sf
    s2_wrap: bool = False  # s2: roll the shifted half around the sequence (LongLoRA's pseudocode), not half groups
    ulysses_degree: int | None = None  # usp: size of the all-to-all sub-group (the ring gets the rest)


@dataclass
class LoraSection:
    enabled: bool = False
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])  # LongLoRA+: also train these


@dataclass
class RopeScalingSection:
    type: Literal["linear", "dynamic", "yarn", "longrope", "llama3"] | None = None
    factor: float | str | None = None  # a number, or "auto" = ceil(data.seq_len / original max positions)
    original_max_position_embeddings: int | None = None


@dataclass
class PasskeySection:
    num_samples: int = 256
    min_depth: float = 0.0
    max_depth: float = 1.0


@dataclass
class SftSection:
    """Supervised fine-tuning data (``data.source: sft``, seqpar/train/sft.py): conversations whose labels are the
    assistant responses only, packed with their boundaries kept or one per sequence, right-padded."""

    shape: Literal["auto", "alpaca", "messages"] = "auto"  # auto: `messages` if that column exists, else Alpaca
    instruction_field: str = "instruction"  # Alpaca (LongAlpaca-12k, LongAlpaca-plus): instruction, input, output
    input_field: str = "input"  # optional column: absent or empty means no input
    output_field: str = "output"
    messages_field: str = "messages"  # chat: a list of {role: system|user|assistant, content}
    # auto: the tokenizer's chat template when it has one, else longlora-llama2 (LongLoRA's supervised-fine-tune.py)
    template: Literal["auto", "tokenizer", "longlora-llama2", "alpaca"] = "auto"
    overlong: Literal["truncate_prompt", "drop"] = "truncate_prompt"  # a conversation longer than data.seq_len
    make: Literal["stdlib-qa"] | None = None  # a chat set made on the spot (no files, no hub): see sft.stdlib_qa
    num_conversations: int = 600  # how many `make` makes


@dataclass
class DataSection:
    source: Literal["passkey", "files", "sft"] = "passkey"
    files: list[str] = field(default_factory=list)
    format: Literal["jsonl", "json", "text", "parquet"] | None = None  # None: from the file extension
    text_field: str = "text"
    tokenizer: str | None = None  # local folder; default: model.path, or a byte tokenizer for from_config
    seq_len: int = 256
    pack: bool = True  # concatenate documents to seq_len, keeping their boundaries (cu_seqlens)
    passkey: PasskeySection = field(default_factory=PasskeySection)
    sft: SftSection = field(default_factory=SftSection)
    eval_fraction: float = 0.0  # held out of the training samples for eval_loss (eval.every), never trained on
    eval_files: list[str] = field(default_factory=list)  # or a separate held-out set (same format and packing)


@dataclass
class TrainerSection:
    max_steps: int = 100
    lr: float = 2e-5
    schedule: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    warmup_steps: int = 20
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    micro_batch: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    dtype: Literal["fp32", "bf16"] = "bf16"
    seed: int = 42
    max_grad_norm: float = 1.0
    output_dir: str = "runs/default"


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"  # optimizer (and, for ZeRO-3, parameter) offload


@dataclass
class Fsdp2Section:
    """``engine: fsdp2`` (seqpar/train/fsdp2.py): FSDP2 ``fully_shard`` over all dp x sp ranks of a DeviceMesh."""

    # true: free each layer's gathered weights after its forward (ZeRO-3-like); false: keep them until its
    # backward (ZeRO-2-like: more memory, one all-gather per layer and step less)
    reshard_after_forward: bool = True
    offload: Literal["none", "cpu"] = "none"  # CPUOffloadPolicy: sharded parameters, gradients, Adam on the host
    dp_size: int | None = None  # None: world / attention.sp_size; if set, the mesh must be dp_size x sp_size


@dataclass
class MemorySection:
    """Longest context per device (seqpar.models.fused_loss / tiled_mlp / offload; ALST's three pieces)."""

    fused_loss: bool = False  # tiled LM head + loss: never the [B, L/N, V] logits
    loss_chunk_size: int = 1024  # rows (tokens) per tile of the fused loss
    tiled_mlp: bool = False  # each MLP over sequence tiles, recomputed in the backward
    mlp_chunk_size: int = 4096  # tokens per MLP tile
    offload_checkpoints: bool | Literal["required"] = False  # checkpointed layer inputs to pinned CPU (CUDA only)


@dataclass
class LaunchSection:
    nnodes: int = 1
    nproc_per_node: int = 1  # the intended world is nnodes x nproc_per_node (used by --dry-run)
    device: Literal["cuda", "cpu"] | None = None  # None: cuda when visible
    rendezvous_timeout: float = 600.0  # seconds the ranks wait for each other before failing with the address


@dataclass
class LoggingSection:
    wandb: bool = True
    project: str = "seqpar"
    name: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    log_every: int = 1


@dataclass
class CheckpointSection:
    every: int = 0  # 0: only at the end
    keep: int = 2
    resume: Literal["never", "auto"] = "never"
    dir: str | None = None  # default: <output_dir>/checkpoints
    # Signals that mean "save and exit 75 to be requeued" (seqpar/train/preemption.py); [] turns it off.
    on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class EvalSection:
    every: int = 0  # 0: never
    batches: int = 2


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    lora: LoraSection = field(default_factory=LoraSection)
    rope_scaling: RopeScalingSection = field(default_factory=RopeScalingSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    engine: Literal["deepspeed", "fsdp2"] = "deepspeed"  # who shards and steps: DeepSpeed ZeRO or FSDP2
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    fsdp2: Fsdp2Section = field(default_factory=Fsdp2Section)
    memory: MemorySection = field(default_factory=MemorySection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        """Every section, but only the section of the engine that runs (``deepspeed`` or ``fsdp2``): a saved
        recipe loads again without tripping the check that refuses the other engine's settings."""
        out = dataclasses.asdict(self)
        out.pop("fsdp2" if self.engine == "deepspeed" else "deepspeed")
        return out


def given_sections(recipe: Recipe) -> frozenset[str]:
    """Top-level keys the YAML file or an override wrote (``engine: fsdp2`` with a ``deepspeed:`` section is an
    error, which the filled-in defaults alone cannot tell apart from no section). Empty for a ``Recipe()``."""
    return getattr(recipe, "_given", frozenset())


# ----------------------------------------------------------------------------------------------------------
# Building: YAML dict -> dataclasses, with type checks that name the dotted key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against ``tp``; raises RecipeError naming ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, "
                              f"got {value!r}")
        return _build(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except RecipeError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
    elif origin is list:
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]  # `lora.targets=q_proj,v_proj`
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is float and isinstance(value, str) and _looks_float(value):
        return float(value)  # YAML 1.1 reads "1e-4" as a string: only float-typed fields take it as a number
    elif (tp is int and isinstance(value, int) and not isinstance(value, bool)) or (
        tp in (bool, str, dict, type(None)) and type(value) is tp
    ):
        return value
    raise RecipeError(f"{path}={value!r}: expected {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = [ALIASES[key]] if ALIASES.get(key) in names else difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise RecipeError(f"{prefix}{key}: unknown key ({hint}valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-4"`` -> (["trainer", "lr"], 1e-4); the value is read as a YAML scalar."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not dotted.key=value (e.g. trainer.max_steps=10)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def _looks_float(s: str) -> bool:
    """A number YAML 1.1 left as a string ("1e-4"); "nan"/"inf" stay strings (and are then rejected)."""
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


def recipe_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = copy.deepcopy(dict(data or {}))  # overrides must not edit the caller's mapping
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    recipe = _build(Recipe, data)
    recipe._given = frozenset(data)  # not a dataclass field: asdict (the saved recipe) leaves it out
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist: pass a YAML file such as recipes/quickstart-cpu.yaml")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}  # safe_load: tags cannot build objects
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {str(path)!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML ({' '.join(str(err).split())}): fix the "
                          "syntax at that line, or start from recipes/quickstart-cpu.yaml") from err
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r}: the top level must be a mapping of sections")
    return recipe_from_dict(data, overrides)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
