"""The matrix: causal-LM families of transformers, each built tiny from its config (hidden 32, two
layers, random weights, output layer scaled so that logits reach tens and a missed soft-cap or
scale shows), saved and loaded the way mio loads a backbone. For each, the logits mio trains on
for a packed batch (its own forward, output layer on supervised positions only) equal the model's
own per-sample forward (relative error <= 1e-5), or packing is refused with a clear reason and
one-sample rows (``data.pack: false``) give the per-sample logits instead."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizer_kinds
import torch
from train_support import shared_root, tiny_args
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mio.cli import main
from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.data.reading import DatasetSpec
from mio.generate.constraints import ModalityConstraint
from mio.generate.generator import Generator
from mio.generate.settings import get_preset
from mio.model.attention import effective_backend
from mio.model.backbone import load_model
from mio.model.forward import (
    PackingError,
    check_packing,
    router_aux_coefficient,
    supervised_logits,
    supervised_positions,
)
from mio.model.saved_tokenizer import save_tokenizer
from mio.train.cli import fit
from mio.train.data import MioDataModule
from mio.vocab import CHAT_MARKERS, VocabTable

pytestmark = pytest.mark.slow  # every family built, trained and compared: minutes

VOCAB = 96
TOL = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2)
WINDOW = 4  # sliding windows shorter than the samples, so a mask that drops them shows
# model_type -> config settings beyond COMMON (transforms after the decoder set to visible values)
FAMILIES: dict[str, dict] = {
    "llama": {}, "qwen2": {}, "qwen3": {"head_dim": 8},
    "qwen3_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 1},
    "qwen2_moe": {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    "mistral": {"sliding_window": WINDOW}, "mixtral": {**MOE, "num_local_experts": 4},
    "gemma": {"head_dim": 8}, "gemma2": {"head_dim": 8, "final_logit_softcapping": 5.0, "sliding_window": WINDOW},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 5.0, "sliding_window": WINDOW},
    "phi3": {}, "phi": {}, "gpt2": {}, "gpt_neox": {}, "gptj": {"rotary_dim": 4}, "opt": {"ffn_dim": 64},
    "falcon": {}, "bloom": {}, "olmo": {}, "olmo2": {}, "olmoe": {**MOE, "num_experts": 4},
    "granite": {"logits_scaling": 4.0}, "granitemoe": {**MOE, "num_local_experts": 4, "logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25}, "cohere2": {"logit_scale": 0.25, "sliding_window": WINDOW},
    "stablelm": {}, "starcoder2": {"sliding_window": WINDOW}, "smollm3": {}, "glm": {}, "exaone4": {},
    "deepseek_v3": {**MOE, "num_key_value_heads": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
                    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                    "v_head_dim": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1},
    "jamba": {**MOE, "num_experts": 4, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "mamba_d_state": 4, "mamba_expand": 2, "mamba_dt_rank": 8},
    "mamba": {"state_size": 4, "expand": 2, "time_step_rank": 8},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 4, "mamba_chunk_size": 16},
    "bamba": {"mamba_n_heads": 8, "mamba_d_state": 4, "mamba_d_head": 8, "mamba_chunk_size": 16},
}
# Packing refused, with the reason: recurrent and hybrid backbones; BLOOM builds its ALiBi biases
# from a 2D mask and fails under a 4D one. They train with data.pack: false.
REFUSED = {"jamba": "recurrent", "mamba": "recurrent", "falcon_h1": "recurrent", "bamba": "recurrent",
           "bloom": "fails under mio's packed-attention mask"}
# Families whose post-decoder transform the matrix must see (the bare output layer differs).
TRANSFORMED = {"gemma2", "gemma3_text", "granite", "granitemoe", "cohere", "cohere2"}
LENGTHS = [5, 7, 3, 6, 1]


def build(model_type: str, folder, **settings) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type], **settings})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn_like(head) * 2.0)  # logits in the tens (tied: the embeddings too)
    model.save_pretrained(folder)
    return load_model(folder).eval()  # as mio loads a backbone: eager where a family has no SDPA


def packed_batch(one_sample_per_row: bool = False):
    rng = np.random.default_rng(0)
    samples = [TokenSample(rng.integers(3, VOCAB, n), np.where(rng.random(n) < 0.8, rng.integers(3, VOCAB, n), -100))
               for n in LENGTHS]
    packs = list(BestFitPacker(context_length=16, buffer_size=4, pack=not one_sample_per_row)(samples))
    return packs, collate_packs(packs)


def own_logits(model, packs) -> torch.Tensor:
    """The model's own forward on each sample alone, at the positions whose next token is supervised."""
    out = []
    for pack in packs:
        start = 0
        for n in pack.seq_lens:
            ids = torch.from_numpy(pack.input_ids[start:start + n])[None]
            keep = torch.from_numpy(pack.labels[start + 1:start + n] != -100)
            out.append(model(input_ids=ids, use_cache=False).logits[0, :-1][keep])
            start += n
    return torch.cat(out)


def mio_logits(model, batch, backend: str, aux: bool):
    return supervised_logits(model, batch, supervised_positions(batch["labels"]), backend, aux_loss=aux)


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape  # (N, V): the output layer ran on supervised positions only
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= TOL, f"{what} differ from the model's own per-sample logits by {error:.2e} (relative)"


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_training_logits_are_the_models_own(model_type, tmp_path):
    model = build(model_type, tmp_path)
    backend = effective_backend(model, "sdpa")
    aux = router_aux_coefficient(model) > 0
    with torch.no_grad():
        packs, batch = packed_batch(one_sample_per_row=True)  # data.pack: false -- every family
        out = mio_logits(model, batch, backend, aux)
        assert_close(out.logits, own_logits(model, packs), f"{model_type}: one-sample rows")
        assert (out.aux_loss is not None) == aux
        if model_type in REFUSED:
            with pytest.raises(PackingError, match=f"{type(model).__name__}.*{REFUSED[model_type]}.*data.pack: false"):
                check_packing(model, backend)
            return
        check_packing(model, backend)
        packs, batch = packed_batch()
        assert any(len(p.seq_lens) > 1 for p in packs)
        assert_close(mio_logits(model, batch, backend, aux).logits, own_logits(model, packs), f"{model_type}: packed")
        if model_type in TRANSFORMED:  # the decoder plus the bare output layer is not the model's output
            ids = torch.from_numpy(packs[0].input_ids[:packs[0].seq_lens[0]])[None]
            bare = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
            own = model(input_ids=ids).logits
            assert (bare - own).abs().max() > 0.1 * own.abs().max()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe"])
def test_router_loss_is_the_models_own_over_real_tokens(model_type, tmp_path):
    """mio's router load-balancing loss of a packed batch (rows padded at the end) equals transformers'
    own loss for the same samples unpacked, one per row with a 2D padding mask: real tokens only."""
    model = build(model_type, tmp_path)
    packs, batch = packed_batch()
    with torch.no_grad():
        ours = mio_logits(model, batch, "sdpa", aux=True).aux_loss
        samples = [p.input_ids[a:a + n] for p in packs for a, n in zip(np.cumsum([0] + p.seq_lens[:-1]), p.seq_lens)]
        width = max(len(x) for x in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for row, x in enumerate(samples):
            ids[row, :len(x)], mask[row, :len(x)] = torch.from_numpy(x), 1
        theirs = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False).aux_loss
    assert batch["document_ids"].lt(0).any()  # the packed batch has padding, which must not count
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert router_aux_coefficient(model) == model.config.router_aux_loss_coef > 0


# --- the whole path on four backbones ------------------------------------------------------------
# (family, its settings, text tokenizer kind): tied embeddings; MoE; SentencePiece; soft-capped.
WHOLE_PATH = {
    "tied": ("qwen2", {"tie_word_embeddings": True}, "qwen2"),
    "moe": ("qwen3_moe", FAMILIES["qwen3_moe"], "llama3"),
    "sentencepiece": ("llama", {}, "sentencepiece_legacy"),
    "soft_capped": ("gemma2", FAMILIES["gemma2"], "sentencepiece"),
}
GREEDY = [f"--set={m}.{f}" for m in ("text", "image", "speech", "video")
          for f in ("do_sample=false", "num_beams=1", "repetition_penalty=1.0")]


def whole_path_base(name: str, folder) -> Path:
    """A text-only base folder: a family built tiny from its config beside a tokenizer of a real kind."""
    model_type, settings, kind = WHOLE_PATH[name]
    tok = tokenizer_kinds.build(kind, folder.parent / f"{name}-tokenizer")
    ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    ids["pad"] = ids["pad"] if ids["pad"] is not None else ids["eos"]
    config = AutoConfig.for_model(model_type, **{**COMMON, **settings, "vocab_size": len(tok),
                                                 **{f"{k}_token_id": v for k, v in ids.items()}})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(tok, folder)  # a `legacy: true` base stays one when reloaded (plain save_pretrained drops it)
    return folder


@pytest.mark.parametrize("name", sorted(WHOLE_PATH))
def test_whole_path(name, tmp_path, tmp_path_factory):
    """extend -> a tiny `mio fit` stage -> vanilla transformers loads the output -> `mio generate`
    greedy gives the tokens `model.generate` gives under the same modality constraint."""
    root = shared_root(tmp_path_factory)
    base = whole_path_base(name, tmp_path / "base")
    out = fit(tiny_args(root, tmp_path / "run", f"--model.backbone={base}", "--trainer.log_every_n_steps=1",
                        steps=1, context=128))
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # vanilla transformers, no mio code
    tok = AutoTokenizer.from_pretrained(out)
    table = VocabTable.load(out)
    assert len(tok) == table.total_size == model.get_input_embeddings().weight.shape[0]
    assert all(len(tok(m, add_special_tokens=False)["input_ids"]) == 1 for m in CHAT_MARKERS)
    if name == "tied":
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if name == "moe":
        logged = csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open())
        rows = [r for r in logged if r["train/loss"]]  # the learning-rate monitor writes rows of its own
        assert rows and all(float(r["train/aux_loss"]) > 0 for r in rows)

    answer = tmp_path / "answer"
    assert main(["generate", "--model", str(out), "--prompt", "a red cat", "--raw", "--out", str(answer),
                 "--max-new-tokens", "10", "--device", "cpu", *GREEDY]) == 0
    record = json.loads((answer / "generation.json").read_text())
    prompt = record["prompt_ids"]
    assert prompt == tok("a red cat")["input_ids"]  # the tokenizer's own ids, BOS as it adds it
    stop = Generator.from_loaded(model, tok, table, device="cpu").stop_ids_for(get_preset("paper"), chat=False)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, num_beams=1,
                                logits_processor=[ModalityConstraint(table)], eos_token_id=stop,
                                pad_token_id=stop[0])[0, len(prompt):].tolist()
    assert record["new_ids"] == theirs[:len(record["new_ids"])]
    assert all(t in stop for t in theirs[len(record["new_ids"]):])


def test_data_pack_false_gives_one_sample_per_row(tmp_path_factory):
    """`data.pack: false`: the packer puts each sample in a row of its own, padded; every sample is there."""
    root = shared_root(tmp_path_factory)
    rows = {}
    for pack in (True, False):
        data = MioDataModule([DatasetSpec("image_text"), DatasetSpec("text")], root=str(root / "data"),
                             context_length=256, batch_size=2, backbone=str(root / "base"), extend_vocab=True,
                             pack=pack)
        data.setup("fit")
        batches = [b for _, b in zip(range(6), data.train_dataloader())]
        rows[pack] = [keys for b in batches for keys in b["keys"]]
        assert all(b["one_sample_per_row"] == (not pack) for b in batches)
    assert all(len(keys) == 1 for keys in rows[False]) and any(len(keys) > 1 for keys in rows[True])
    assert data.state_dict()["pack"] is False  # resuming checks it


def test_fit_refuses_to_pack_a_recurrent_backbone(tmp_path, tmp_path_factory):
    root = shared_root(tmp_path_factory)
    base = tmp_path / "mamba"
    tok = AutoTokenizer.from_pretrained(root / "base")
    build("mamba", base, vocab_size=len(tok))
    tok.save_pretrained(base)
    with pytest.raises(PackingError, match="MambaForCausalLM has recurrent.*data.pack: false"):
        fit(tiny_args(root, tmp_path / "run", f"--model.backbone={base}", steps=1, context=128))
