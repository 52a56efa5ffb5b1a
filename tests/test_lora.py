"""LoRA with peft on a tiny extended backbone: the trainable-parameter count equals the formula,
the adapter folder loads in plain peft (no mio import) with equal logits, `mio export --merge`
writes a plain model with the adapter's logits (LoRA under FSDP2: tests/test_train_fsdp2.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS
from transformers import AutoModelForCausalLM

from mio.export import export_main
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone, save_model_folder
from mio.model.lora import LoraSettings, apply_lora, parameter_report
from mio.train.module import MioModule
from mio.vocab import VocabTable

ADDED = 12_294  # mio's added tokens: 6 specials + 8192 image + 4096 speech codes
D, FFN, LAYERS, HEADS, KV = 64, 128, 2, 4, 2  # the tiny_base fixture's shape
HEAD = D // HEADS
LINEAR = {"q_proj": (D, HEADS * HEAD), "k_proj": (D, KV * HEAD), "v_proj": (D, KV * HEAD), "o_proj": (HEADS * HEAD, D),
          "gate_proj": (D, FFN), "up_proj": (D, FFN), "down_proj": (FFN, D)}  # (in, out) per block


@pytest.fixture(scope="module")
def extended(tiny_base, tmp_path_factory):
    """The tiny base extended with mio's tokens, saved as a stage output would be."""
    model, tok, table = load_backbone(tiny_base, extend=True)
    return save_model_folder(model, tok, table, tmp_path_factory.mktemp("ext") / "model")


def lora_model(folder: Path, settings: LoraSettings):
    model, tok, table = load_backbone(folder)
    return apply_lora(model, settings, table, folder), tok, table


def expected_trainable(rank: int, targets: list[str], new_rows: int, matrices: int) -> int:
    """LoRA: r * (in + out) per adapted linear layer; added tokens: rows * D per matrix."""
    return LAYERS * rank * sum(sum(LINEAR[t]) for t in targets) + new_rows * D * matrices


@pytest.mark.parametrize("rank, targets, new_tokens", [
    (4, ["q_proj", "v_proj"], True),
    (2, "all-linear", False),
    (8, ["down_proj"], True),
])
def test_trainable_parameters_equal_the_formula(extended, rank, targets, new_tokens):
    model, _, _ = lora_model(extended, LoraSettings(rank=rank, target_modules=targets, train_new_tokens=new_tokens))
    names = list(LINEAR) if targets == "all-linear" else targets
    want = expected_trainable(rank, names, ADDED if new_tokens else 0, matrices=2)
    report = parameter_report(model)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == want
    assert report.groups["lora adapters"] == (LAYERS * rank * sum(sum(LINEAR[t]) for t in names),) * 2
    if new_tokens:
        assert report.groups["added-token rows"] == (2 * ADDED * D,) * 2
    frozen = {g: c for g, c in report.groups.items() if g not in ("lora adapters", "added-token rows")}
    assert all(trainable == 0 for trainable, _ in frozen.values())
    base, _, table = load_backbone(extended)
    assert sum(total for _, total in frozen.values()) == sum(p.numel() for p in base.parameters())
    assert report.lines()[0].startswith(f"parameters: {report.total:,} total, {want:,} trainable")


@pytest.mark.slow
def test_tied_output_layer_shares_the_added_rows(tmp_path):
    cfg = TinyLlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          num_key_value_heads=KV, text_vocab_size=400, tie_word_embeddings=True)
    model, tok, table = load_backbone(build_tiny_backbone(CORPUS * 4, cfg, tmp_path / "base"), extend=True)
    folder = save_model_folder(model, tok, table, tmp_path / "ext")
    peft_model, _, _ = lora_model(folder, LoraSettings(rank=4, target_modules=["q_proj"]))
    assert parameter_report(peft_model).trainable == expected_trainable(4, ["q_proj"], ADDED, matrices=1)
    ids = torch.tensor([[table.image_start + 3]])
    with torch.no_grad():  # a trained added row moves the input and the tied output row together
        peft_model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"][3] += 1.0
        emb = peft_model.get_input_embeddings()(ids)[0, 0]
        out_row = peft_model.get_output_embeddings()(torch.eye(D))[:, table.image_start + 3]
    torch.testing.assert_close(emb, out_row)


def trained_adapter(extended: Path, out: Path) -> tuple[torch.nn.Module, VocabTable, Path]:
    """A LoRA model with non-zero adapters and moved added rows (as after training), saved the
    way a LoRA stage saves it."""
    model, tok, table = lora_model(extended, LoraSettings(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    return model, table, save_model_folder(model, tok, table, out)


PLAIN_PEFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
adapter, ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
with torch.no_grad():
    logits = model(ids).logits
    merged = model.merge_and_unload()(ids).logits
mio = sorted(m for m in sys.modules if m == "mio" or m.startswith("mio."))
torch.save({"adapter": logits, "merged": merged, "mio_modules": mio}, out)
"""


@pytest.mark.slow
def test_adapter_loads_in_plain_peft_and_merges_with_equal_logits(extended, tmp_path, capsys):
    model, table, adapter = trained_adapter(extended, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "mio_vocab.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()  # an adapter, not a full model
    ids = torch.tensor([[1, 5, 9, table.image_begin, table.image_start + 7, table.image_end,
                         table.speech_begin, table.speech_start + 1030, table.speech_end, 12]])
    with torch.no_grad():
        want = model(ids).logits
    result = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(adapter), json.dumps(ids.tolist()), str(result)],
                   check=True, cwd=tmp_path)
    plain = torch.load(result, weights_only=True)
    assert plain["mio_modules"] == []
    torch.testing.assert_close(plain["adapter"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain["merged"], want, rtol=1e-5, atol=1e-5)

    merged = tmp_path / "merged"
    assert export_main(["--merge", str(adapter), "--out", str(merged)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(merged)
    vanilla = AutoModelForCausalLM.from_pretrained(merged)  # a plain model folder: no peft, no mio
    with torch.no_grad():
        torch.testing.assert_close(vanilla(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert VocabTable.load(merged) == table and (merged / "generation_config.json").is_file()


@pytest.mark.slow
def test_export_refuses_bad_input_with_clear_errors(extended, tmp_path, capsys):
    assert export_main(["--merge", str(extended), "--out", str(tmp_path / "x")]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    _, _, adapter = trained_adapter(extended, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert export_main(["--merge", str(adapter), "--out", str(tmp_path / "y")]) == 2
    assert "base model folder is missing" in capsys.readouterr().err
    assert export_main(["--merge", str(adapter), "--base", str(extended), "--out", str(tmp_path / "z")]) == 0


def test_lora_refuses_an_unextended_backbone(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    table = VocabTable.mio_default(model.get_input_embeddings().weight.shape[0])
    with pytest.raises(ValueError, match="already extended"):
        apply_lora(model, LoraSettings(), table, tiny_base)
    with pytest.raises(ValueError, match="drop model.extend_vocab"):
        MioModule(str(tiny_base), extend_vocab=True, lora=LoraSettings())


def test_settings_are_checked():
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}):
        with pytest.raises(ValueError, match="lora"):
            LoraSettings(**bad)
