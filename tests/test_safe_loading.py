"""Safe loading: no file seqpar reads can run code. Weights come from safetensors or pickle files whose
globals are checked first (torch's ``weights_only`` allow-list, plus DeepSpeed's three state classes);
recipes are read with ``yaml.safe_load``; ``trust_remote_code`` stays off unless a recipe turns it on.

Each payload below would write a marker file when unpickled / constructed / imported; the tests check that
it is refused with a one-line error and that the marker never appears.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from seqpar.train import checkpoint as ckpt
from seqpar.train.recipe import RecipeError, load_recipe
from tests.test_bad_inputs import QUICK, fake_checkpoint, one_error_line, tiny_model

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _resume(output_dir: Path, monkeypatch, capsys) -> str:
    import seqpar.train.trainer as trainer
    from seqpar.cli import main

    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("an unsafe checkpoint reached training"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert main(["train", str(QUICK), f"trainer.output_dir={output_dir}", "--resume"]) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["deepspeed/state/mp_rank_00_model_states.pt", "rng/rank0.pt", "raw pickle"])
def test_pickled_payload_in_a_checkpoint_is_refused(where, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    folder = fake_checkpoint(tmp_path / "run")
    if where == "raw pickle":  # not even a torch zip file: plain pickle bytes under a .pt name
        where = "rng/rank1.pt"
        (folder / where).write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"module": Payload(marker)}, folder / where)
    ckpt.write_manifest(folder)  # an attacker rewrites the manifest too: sizes alone cannot catch this
    line = _resume(tmp_path / "run", monkeypatch, capsys)
    assert where in line and "refused" in line and "step-00000003" in line, line
    assert not marker.exists(), "the payload ran"


def test_file_added_after_the_checkpoint_was_written_is_refused(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    folder = fake_checkpoint(tmp_path / "run")
    torch.save(Payload(marker), folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    line = _resume(tmp_path / "run", monkeypatch, capsys)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in line and "not written by seqpar" in line, line
    assert not marker.exists()


def test_deepspeed_state_classes_are_allowed(tmp_path):
    """A real DeepSpeed optimizer state holds ZeroStageEnum / LossScaler / fragment_address: still loadable."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = fake_checkpoint(tmp_path / "run")
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": {"exp_avg": torch.zeros(3)}},
               folder / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ckpt.write_manifest(folder)
    recipe = load_recipe(QUICK, [f"trainer.output_dir={tmp_path / 'run'}"])
    assert ckpt.verify_checkpoint(folder, recipe, world_size=2) == 3


def test_model_folder_pickle_weights(tmp_path):
    """A pickle-only model folder with a payload is refused before loading; next to safetensors it is ignored."""
    from seqpar.train.model import load_model
    from seqpar.train.validate import validate

    marker = tmp_path / "marker"
    evil = tiny_model(tmp_path / "evil", weights=False)
    torch.save({"model.embed_tokens.weight": Payload(marker)}, evil / "pytorch_model.bin")
    recipe = load_recipe(QUICK, ["model.from_config=null", f"model.path={evil}", "attention.sp_size=1"])
    with pytest.raises(RecipeError) as err:
        validate(recipe, 1, check_paths=True)
    assert "pytorch_model.bin" in str(err.value) and "builtins.exec" in str(err.value)
    both = tiny_model(tmp_path / "both")
    torch.save({"model.embed_tokens.weight": Payload(marker)}, both / "pytorch_model.bin")
    recipe = load_recipe(QUICK, ["model.from_config=null", f"model.path={both}", "attention.sp_size=1",
                                 "rope_scaling.type=null", "trainer.dtype=fp32"])
    load_model(recipe, both)  # reads model.safetensors only
    assert not marker.exists()


def test_recipe_yaml_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"trainer: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    assert not marker.exists()


def test_remote_code_needs_an_explicit_opt_in(tmp_path):
    from seqpar.train.validate import validate

    marker = tmp_path / "marker"
    folder = tiny_model(tmp_path / "custom")
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").write_text(cfg.replace('"model_type": "llama"', '"model_type": "evil_llama", '
                                                    '"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}'))
    (folder / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                                  "from transformers import LlamaConfig as EvilConfig\n")
    recipe = load_recipe(QUICK, ["model.from_config=null", f"model.path={folder}", "attention.sp_size=1"])
    assert recipe.model.trust_remote_code is False
    with pytest.raises(RecipeError) as err:
        validate(recipe, 1, check_paths=True)
    assert "model.trust_remote_code" in str(err.value) and "configuration_evil" in str(err.value)
    assert not marker.exists()


def test_code_base_audit():
    """Every torch.load in seqpar/ says weights_only=True (one documented exception); no yaml.load/pickle.load."""
    allowed = {("seqpar/launcher.py", "torch.load(io.BytesIO(payload), weights_only=False)")}  # its own children
    found = []
    for path in sorted((ROOT / "seqpar").rglob("*.py")):
        rel, text = str(path.relative_to(ROOT)), path.read_text()
        for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in call and (rel, call) not in allowed:
                found.append(f"{rel}: {call}")
        for bad in re.findall(r"yaml\.(?:load|unsafe_load|full_load)\(|pickle\.loads?\(|trust_remote_code=True", text):
            found.append(f"{rel}: {bad}")
    assert not found, "unsafe loading:\n" + "\n".join(found)
