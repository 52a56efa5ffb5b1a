"""`mio plan`: a stage's model built on the meta device from its backbone's config.json alone; the
parameter counts equal the closed form of a Llama block, and the per-GPU memory under DDP and FSDP2
and the activation estimate equal the formulas mio/plan.py states."""

import json

import pytest
from train_support import ROOT
from transformers import LlamaConfig

from mio.cli import main
from mio.model.lora import LoraSettings
from mio.plan import ModelShape, plan, stage_model

ADDED = 12_294
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
GQA = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
           vocab_size=1000, tie_word_embeddings=True)


def backbone(tmp_path, **shape):
    LlamaConfig(**shape).save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    return tmp_path


def llama_parameters(h, i, layers, heads, kv_heads, vocab, tied=False):
    """Closed form: embedding (and untied output layer) V x h; per layer q, o h x h, k, v h x kv,
    gate, up, down h x i, two norms h; the final norm h."""
    kv = kv_heads * h // heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return vocab * h * (1 if tied else 2) + layers * per_layer + h


def test_7b_llama_extended_counts_and_memory_match_the_closed_form(tmp_path, capsys):
    shape = ModelShape.of(stage_model(backbone(tmp_path, **LLAMA_7B), extend_vocab=True, lora=None))
    vocab = 32000 + ADDED
    params = llama_parameters(4096, 11008, 32, 32, 32, vocab)
    assert shape.parameters == shape.trainable == params == 6_839_128_064
    assert shape.vocab == vocab and shape.layers == 32 and shape.kv_width == 4096
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert shape.largest_unit == max(layer, vocab * 4096 + 4096)

    rows = {r["gpus"]: r for r in (plan(shape, g, 8, 2800, 4) for g in (8, 32))}
    for gpus, row in rows.items():
        assert row["ddp"]["total"] == pytest.approx(16 * params / 1e9, abs=0.01)  # 4 + 4 + 8 bytes each
        assert row["fsdp2"]["total"] == pytest.approx((16 * params / gpus + 4 * shape.largest_unit) / 1e9, abs=0.01)
    assert rows[32]["fsdp2_hybrid"] == rows[8]["fsdp2"]  # sharded within a node of 8
    tokens = 2800 * 4
    per_layer = 2 * (6 * 4096 + 2 * 4096 + 4 * 11008) * tokens
    assert rows[8]["activations"]["without_checkpointing"] == pytest.approx((32 * per_layer + 6 * vocab * tokens) / 1e9,
                                                                            abs=0.01)
    assert rows[8]["activations"]["with_checkpointing"] == pytest.approx(
        (32 * 2 * 4096 * tokens + per_layer + 6 * vocab * tokens) / 1e9, abs=0.01)

    # The stage YAML gives extend_vocab, the context (2800) and the micro-batch (4).
    assert main(["plan", "--config", str(ROOT / "stages" / "1_alignment.yaml"), "--backbone", str(tmp_path),
                 "--gpus", "8", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[-1])["plans"] == list(rows.values())
    assert "fsdp2_hybrid" in "\n".join(out[:-1])


def test_lora_grouped_query_tied_counts(tmp_path):
    """An extended backbone (a previous stage's output) with LoRA: trainable = r x (in + out) per
    adapted linear layer + the added rows (tied: one matrix)."""
    shape_kw = dict(GQA, vocab_size=1000 + ADDED)
    model = stage_model(backbone(tmp_path, **shape_kw), extend_vocab=False, lora=LoraSettings(rank=4))
    shape = ModelShape.of(model)
    h, i, kv = 256, 704, 2 * 256 // 8
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    lora = 3 * 4 * sum(a + b for a, b in linear)
    assert shape.trainable == lora + ADDED * h
    assert shape.kv_width == kv
    frozen = llama_parameters(h, i, 3, 8, 2, 1000 + ADDED, tied=True)
    assert shape.parameters == frozen + shape.trainable  # peft keeps the added rows beside the frozen matrix


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["plan", "--backbone", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["plan", "--backbone", str(backbone(tmp_path, **GQA)), "--gpus", "0"]) == 2
    assert "--gpus must be at least 1" in capsys.readouterr().err
