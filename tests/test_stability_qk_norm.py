"""QK-norm (mio/model/qk_norm.py): a Llama backbone trains in Qwen3's layout and its stage writes a
folder vanilla transformers loads with the same logits; the norms start at the backbone's own
query and key scales; families with QK-norm keep theirs; any other is refused."""

from __future__ import annotations

import re

import pytest
import torch
from train_support import shared_root, tiny_args
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig

from mio.data.reading import DatasetSpec
from mio.model.backbone import save_model_folder
from mio.model.qk_norm import QkNormError, qwen3_config
from mio.train.cli import fit
from mio.train.data import MioDataModule
from mio.train.module import MioModule


def connected(root, backbone, tmp_path, extend: bool = True, **settings) -> MioModule:
    torch.manual_seed(0)
    module = MioModule(str(backbone), extend_vocab=extend, qk_norm=True, **settings)
    data = MioDataModule([DatasetSpec("image_text"), DatasetSpec("speech_text")], root=str(root / "data"),
                         context_length=256, batch_size=2, buffer_size=4, backbone=str(backbone), extend_vocab=extend)
    module.connect(data, stage_dir=tmp_path)
    data.setup("fit")
    module.load_weights()
    return module


SHAPES = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


@pytest.mark.parametrize("config", [
    LlamaConfig(**SHAPES),
    LlamaConfig(**SHAPES, attention_bias=True, tie_word_embeddings=True, head_dim=16),
    LlamaConfig(**SHAPES, max_position_embeddings=4096, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512}),
    MistralConfig(**SHAPES, head_dim=8, sliding_window=None),
    MistralConfig(**SHAPES, head_dim=8, sliding_window=5),
], ids=["llama", "bias_tied_head_dim", "llama3_rope", "mistral", "mistral_window"])
def test_qwen3s_layout_without_its_norms_is_the_backbone(config):
    """The conversion is exact but for the norms: the Qwen3 model with every q/k norm taken out
    gives the Llama's (Mistral's) logits from the same weights -- shapes, rotary scaling, biases,
    tied output, sliding window -- on a sequence longer than the window."""
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config).eval()
    converted = AutoModelForCausalLM.from_config(qwen3_config(config)).eval()
    missing, unexpected = converted.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and {k.rsplit(".", 2)[-2] for k in missing} == {"q_norm", "k_norm"}
    for layer in converted.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, backbone(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_llama_becomes_qwen3_with_norms_at_its_own_scales(tmp_path_factory, tmp_path, capsys):
    root = shared_root(tmp_path_factory)
    module = connected(root, root / "base", tmp_path)
    model = module.model
    assert type(model).__name__ == "Qwen3ForCausalLM" and module.table.total_size == model.config.vocab_size
    printed = capsys.readouterr().err
    before, after = map(float, re.search(r"first micro-batch ([\d.]+) -> ([\d.]+)", printed).groups())
    print(f"first loss on the tiny stage: {before:.4f} -> {after:.4f}")
    assert abs(after - before) < 0.05 * before

    # Layer 0's query and key scales, computed apart: the mean over real tokens and heads of each
    # head's RMS, from the embeddings through the first norm and the projections.
    torch.manual_seed(0)
    llama = MioModule(str(root / "base"), extend_vocab=True)
    llama.load_weights()
    batch = module.data.first_batch()
    real = batch["document_ids"] >= 0
    layer = llama.model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(llama.model.model.embed_tokens(batch["input_ids"]))
        for proj, norm in ((layer.self_attn.q_proj, "q_norm"), (layer.self_attn.k_proj, "k_norm")):
            heads = proj(x).unflatten(-1, (-1, model.config.head_dim))  # (B, L, H, D)
            want = heads.pow(2).mean(-1).sqrt()[real].mean()
            weight = getattr(model.model.layers[0].self_attn, norm).weight
            torch.testing.assert_close(weight, torch.full_like(weight, float(want)), rtol=1e-5, atol=0)
        # Every other weight is the Llama's.
        theirs = llama.model.state_dict()
        for name, tensor in model.state_dict().items():
            if not name.endswith(("q_norm.weight", "k_norm.weight")):
                torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0)

    # The folder a stage writes loads in vanilla transformers, as Qwen3, with the same logits.
    out = save_model_folder(model, module.tokenizer, module.table, tmp_path / "model")
    vanilla, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(vanilla).__name__ == "Qwen3ForCausalLM" and not any(info.values()), info
    ids = torch.tensor([[1, 5, 9, 300, 310, 4000, 12000, 12500, 7]])
    with torch.no_grad():
        torch.testing.assert_close(vanilla.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def tiny_family(model_type: str, folder, base, **config) -> str:
    """A tiny model of ``model_type`` over the tiny base's tokenizer, already extended by mio."""
    tok = AutoTokenizer.from_pretrained(base)
    settings = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **config)
    if model_type == "qwen3":
        settings["head_dim"] = 8
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_a_family_with_qk_norm_keeps_it_and_others_are_refused(tmp_path_factory, tmp_path):
    root = shared_root(tmp_path_factory)
    qwen3 = tiny_family("qwen3", tmp_path / "qwen3", root / "base")
    module = MioModule(qwen3, extend_vocab=True, qk_norm=True)  # no data needed: nothing to convert
    module.load_weights()
    assert type(module.model).__name__ == "Qwen3ForCausalLM"
    assert torch.equal(module.model.model.layers[0].self_attn.q_norm.weight,
                       AutoModelForCausalLM.from_pretrained(qwen3).model.layers[0].self_attn.q_norm.weight)
    gpt2 = tiny_family("gpt2", tmp_path / "gpt2", root / "base")
    with pytest.raises(QkNormError, match=r"model.qk_norm: .*gpt2 is a gpt2 backbone; mio gives QK-norm to Llama"):
        MioModule(gpt2, extend_vocab=True, qk_norm=True)


@pytest.mark.slow
def test_a_tiny_stage_with_qk_norm_writes_a_qwen3_folder(tmp_path_factory, tmp_path):
    root = shared_root(tmp_path_factory)
    out = fit(tiny_args(root, tmp_path, "--model.qk_norm=true", "--data.val_fraction=0", steps=2))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    norms = model.model.layers[1].self_attn.k_norm.weight
    assert torch.isfinite(norms).all() and not torch.equal(norms, torch.ones_like(norms))


@pytest.mark.slow
def test_a_mistral_becomes_qwen3_with_its_sliding_window(tmp_path_factory, tmp_path):
    """Mistral's decoder layer is Llama's: it converts too, its window (on every layer) kept as Qwen3's."""
    root, window = shared_root(tmp_path_factory), 16
    mistral = tiny_family("mistral", tmp_path / "mistral", root / "base", sliding_window=window, head_dim=8)
    module = connected(root, mistral, tmp_path)
    model = module.model
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.sliding_window == window
    assert set(model.config.layer_types) == {"sliding_attention"}
    torch.manual_seed(0)
    unconverted = MioModule(mistral, extend_vocab=True)
    unconverted.load_weights()
    theirs = unconverted.model.state_dict()
    for name, tensor in model.state_dict().items():  # every weight but the norms is the Mistral's
        if not name.endswith(("q_norm.weight", "k_norm.weight")):
            torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0)
    # The written folder reloads in vanilla transformers with the same logits, past the window too.
    out = save_model_folder(model, module.tokenizer, module.table, tmp_path / "model")
    vanilla = AutoModelForCausalLM.from_pretrained(out).eval()
    assert vanilla.config.sliding_window == window
    ids = torch.randint(0, vanilla.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vanilla(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
