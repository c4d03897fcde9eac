"""Model facts and loading: config (from a local folder, a tiny one from the recipe, or recipe facts for
--dry-run), RoPE scaling written into that config, and the model itself.

No hub access: ``model.path`` is a local Hugging Face folder; ``model.from_config`` builds a tiny random
model that rank 0 saves under ``<output_dir>/base_model`` so every rank (and ``seqpar merge-lora`` later)
loads the very same weights with ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from seqpar.train.recipe import Recipe, RecipeError

BASE_DIR = "base_model"


def config_source(recipe: Recipe) -> str:
    m = recipe.model
    if m.from_config is not None:
        return "model.from_config (a randomly initialised model built on the spot)"
    if m.path and Path(m.path).is_dir():
        return f"model.path {m.path}"
    return f"model.config facts written in the recipe (model.path {m.path!r} is not on this machine)"


def base_config(recipe: Recipe) -> Any:
    """The model's config before RoPE scaling: a transformers config, or a namespace of facts."""
    from transformers import AutoConfig

    import seqpar.models.linear_llama  # noqa: F401  (registers model_type "linear_llama" with AutoConfig)

    m = recipe.model
    if m.from_config is not None:
        facts, key = dict(m.from_config), "model.from_config"
    elif m.path and Path(m.path).is_dir():
        return folder_config(m.path, m.trust_remote_code)
    elif m.config:
        facts, key = dict(m.config), "model.config"
    else:
        raise RecipeError(
            f"model.path={m.path!r} does not exist and model.config is empty: put the Hugging Face model "
            "folder at model.path, or (for --dry-run) write its facts under model.config "
            "(model_type, num_attention_heads, num_key_value_heads, max_position_embeddings, ...)"
        )
    model_type = facts.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **facts)
    except (ValueError, TypeError, KeyError) as err:
        raise RecipeError(
            f"{key}.model_type={model_type!r}: {err} (use llama, mistral, qwen2 or linear_llama)"
        ) from err


def rope_factor(recipe: Recipe, config: Any) -> float | None:
    """LongLoRA's linear position interpolation factor: ceil(target length / original context) for 'auto'."""
    rs = recipe.rope_scaling
    if rs.type is None:
        return None
    if rs.factor in (None, "auto"):
        orig = rs.original_max_position_embeddings or getattr(config, "max_position_embeddings", None)
        return float(max(1, math.ceil(recipe.data.seq_len / orig)))
    return float(rs.factor)


def apply_rope_scaling(recipe: Recipe, config: Any) -> dict | None:
    """Write the recipe's RoPE scaling into ``config`` (so it is saved with every checkpoint)."""
    factor = rope_factor(recipe, config)
    if factor is None:
        return None
    rs = recipe.rope_scaling
    spec: dict = {"rope_type": rs.type, "factor": factor}
    orig = rs.original_max_position_embeddings or getattr(config, "max_position_embeddings", None)
    if rs.type in ("yarn", "longrope", "llama3", "dynamic"):
        spec["original_max_position_embeddings"] = orig
    if rs.type != "dynamic" and orig:  # dynamic NTK reads max_position_embeddings as the original context
        # the context the run trains for: eval, generation and the merged config.json then accept it
        config.max_position_embeddings = max(int(orig), math.ceil(orig * factor))
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        old = dict(getattr(config, "rope_parameters", None) or {})
        spec["rope_theta"] = old.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        config.rope_parameters = spec
    else:
        config.rope_scaling = {"type": rs.type, **spec}
    return spec


def torch_dtype(recipe: Recipe) -> torch.dtype:
    return torch.bfloat16 if recipe.trainer.dtype == "bf16" else torch.float32


def build_base_model(recipe: Recipe, folder: Path, tokenizer) -> None:
    """Rank 0: build the tiny ``from_config`` model with the recipe's seed and save it (safetensors)."""
    from transformers import AutoModelForCausalLM

    config = base_config(recipe)
    torch.manual_seed(recipe.trainer.seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_model(recipe: Recipe, path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The causal LM at ``path`` with the recipe's RoPE scaling and dtype (on CPU; the engine moves it).
    ``dtype`` overrides trainer.dtype: FSDP2 keeps float32 master weights and casts to bf16 for compute."""
    from transformers import AutoModelForCausalLM

    m = recipe.model
    if not Path(path).is_dir():
        raise RecipeError(f"model.path={str(path)!r} does not exist: download the model to that local folder "
                          "(no hub access is attempted)")
    config = folder_config(path, m.trust_remote_code)
    apply_rope_scaling(recipe, config)
    safe = any(Path(path).glob("*.safetensors"))  # then pickle .bin files next to them are never read
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype or torch_dtype(recipe), trust_remote_code=m.trust_remote_code,
        use_safetensors=True if safe else None,
    )


def folder_config(path: str | Path, trust_remote_code: bool) -> Any:
    """The config of a local model folder. One that needs its own Python code (``auto_map`` with a
    model_type transformers does not know) is refused unless the recipe sets model.trust_remote_code."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import seqpar.models.linear_llama  # noqa: F401  (registers model_type "linear_llama" with AutoConfig)

    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise RecipeError(f"model.path={str(path)!r}: config.json is missing or unreadable ({type(err).__name__}): "
                          "point model.path at a Hugging Face model folder (save_pretrained writes one)") from err
    if raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING and not trust_remote_code:
        refs = [r for v in raw["auto_map"].values() for r in (v if isinstance(v, list) else [v]) if r]
        code = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})
        raise RecipeError(f"model.path={str(path)!r} needs its own Python code to load ({', '.join(code)}, "
                          f"model_type={raw.get('model_type')!r}): set model.trust_remote_code=true only if you "
                          "trust that code")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as err:
        raise RecipeError(f"model.path={str(path)!r}: transformers cannot read its config "
                          f"({' '.join(str(err).split())[:200]}): check config.json") from err


_MODELS: dict[str, Any] = {}  # config JSON -> the model built on the meta device (None: not buildable)


def meta_model(config: Any) -> Any:
    """``config``'s causal LM built on the meta device (no memory, no initialisation), or None where
    transformers cannot build it (the validator then skips the checks that need it, the planner uses its dense
    formula); cached: the validator, the planner and its search read one config many times."""
    import copy

    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        return None
    key = f"{type(config).__module__}.{type(config).__name__}:{config.to_json_string(use_diff=False)}"
    if key not in _MODELS:
        try:
            with torch.device("meta"):
                _MODELS[key] = AutoModelForCausalLM.from_config(copy.deepcopy(config))
        except Exception:  # any config transformers cannot build
            _MODELS[key] = None
        while len(_MODELS) > 4:
            _MODELS.pop(next(iter(_MODELS)))
    return _MODELS[key]


def decoder_layers(model: Any) -> Any:
    """The model's stack of decoder layers: its longest ``nn.ModuleList`` (``model.model.layers`` in HF code)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def module_leaf_names(config: Any) -> set[str] | None:
    """Leaf module names of the model (built on the meta device: no memory), or None when unknown."""
    model = meta_model(config)
    return None if model is None else {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def module_class_names(config: Any) -> set[str] | None:
    """Class names of the model's modules (built on the meta device), or None when unknown."""
    model = meta_model(config)
    return None if model is None else {type(m).__name__ for m in model.modules()}


def patch_for_training(model: Any, recipe: Recipe, parallel: Any) -> Any:
    """The recipe's attention over ``parallel`` (``patch_model``), gradient checkpointing and LoRA: what
    ``seqpar train`` and ``--simulate`` do to a built model before the memory options. Returns the model."""
    from seqpar.models import patch_model

    a = recipe.attention
    patch_model(model, a.name, parallel, layout=a.layout, group_size_ratio=a.group_size_ratio,
                num_sink_tokens=a.num_sink_tokens, ulysses_degree=a.ulysses_degree, s2_wrap=a.s2_wrap)
    if recipe.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora.enabled:
        from seqpar.train.lora import apply_lora

        model = apply_lora(model, recipe.lora)
    return model
