"""SFT: MIO's chat format with assistant-only labels (checked token by token), the 16 task-family
recipes, bad conversations skipped with counted reasons, and a LoRA SFT stage run through
`mio fit` that lowers the loss on its data and leaves the base weights bit-identical."""

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from mio.cli import main
from mio.data.prepare import prepare
from mio.data.reading import DatasetSpec, TrainingRenderer
from mio.data.shards import StoredSample, iter_shard, list_shards
from mio.model.attention import packed_attention_kwargs
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone, save_model_folder
from mio.segments import Image, Speech, Text
from mio.templates import SPEECH_ONLY_TASKS, SYSTEM_SPEECH, SYSTEM_STANDARD, Turn, render_chat
from mio.train.data import MioDataModule

pytestmark = pytest.mark.slow  # each test trains a stage

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "data_recipes" / "sft"
TOKENIZERS = ROOT / "tokenizers" / "tiny"
# The SFT task families of the paper's mixture (MIO, Sec. 3 / Table 7).
FAMILIES = {"language_chat", "multimodal_icl", "multimodal_cot", "chart_understanding", "image_editing", "asr",
            "video_dialogue", "image_qa", "speech_generation", "speech_understanding", "image_captioning",
            "descriptive_image_generation", "tts", "video_generation", "video_understanding", "visual_storytelling"}
SFT_SPEC = DatasetSpec(path="sft", format="sft")


def conversation_texts() -> list[str]:
    texts = []
    for path in sorted((RECIPES / "samples").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            for m in json.loads(line)["messages"]:
                texts += [c["text"] for c in m["content"] if "text" in c]
    return texts


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """Every family recipe prepared with the tiny tokenizers, and an extended tiny backbone."""
    out = tmp_path_factory.mktemp("sft")
    manifests = {r.stem: prepare(r, out / "data" / "sft_tasks" / r.stem, tokenizer_dir=TOKENIZERS)
                 for r in sorted(RECIPES.glob("*.yaml"))}
    cfg = TinyLlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, text_vocab_size=400)
    model, tok, table = load_backbone(build_tiny_backbone(conversation_texts(), cfg, out / "base"), extend=True)
    save_model_folder(model, tok, table, out / "ext")
    return out, manifests


def stored(folder: Path) -> list[StoredSample]:
    return [s for shard in list_shards(folder) for s in iter_shard(shard)]


# --- chat format ---------------------------------------------------------------------------------
def expected_labels(ids: np.ndarray, tokenizer) -> tuple[np.ndarray, list[str]]:
    """Labels from the ChatML markup alone: each turn runs from ``<|im_start|>role\\n`` to its
    ``<|im_end|>``; the content and the ``<|im_end|>`` of assistant turns are supervised."""
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    want = np.full(len(ids), -100)
    roles, i = [], 0
    while i < len(ids):
        if ids[i] != im_start:
            i += 1
            continue
        j, header = i + 1, ""
        while not header.endswith("\n"):
            header += tokenizer.decode([int(ids[j])])
            j += 1
        end = j + list(ids[j:]).index(im_end)
        roles.append(header.strip())
        if roles[-1] == "assistant":
            want[j:end + 1] = ids[j:end + 1]
        i = end + 1
    return want, roles


def test_only_assistant_tokens_carry_labels(sft):
    out, _ = sft
    _, tok, table = load_backbone(out / "ext")
    rng = np.random.default_rng(0)
    user_image, out_image = rng.integers(0, 8192, 32), rng.integers(0, 8192, 32)
    user_speech, out_speech = rng.integers(0, 1024, (4, 9)), rng.integers(0, 1024, (4, 7))
    turns = [Turn("user", [Image(user_image), Text("What is this?")]), Turn("assistant", [Text("a cat")]),
             Turn("user", [Speech(user_speech), Text("Say it back")]), Turn("assistant", [Speech(out_speech)]),
             Turn("user", [Text("Draw it")]), Turn("assistant", [Image(out_image), Text("done")])]
    sample = TrainingRenderer(tok, table)(StoredSample("chat-1", "sft", turns=turns, task="speech_generation"),
                                  SFT_SPEC, random.Random(0))
    ids, labels = sample.input_ids, sample.labels
    want, roles = expected_labels(ids, tok)
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    # Token by token; the sample ends with its last <|im_end|>, supervised, and no EOS after it.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == im_end and labels[-1] == im_end and tok.eos_token_id not in ids
    np.testing.assert_array_equal(labels, want)
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    # Speech as input is its content layer; as output all four layers, layer after layer.
    user_ids = table.speech_start + user_speech[0]
    out_ids = (table.speech_start + np.arange(4)[:, None] * 1024 + out_speech).reshape(-1)
    supervised = ids[labels != -100]
    assert _contains(ids, user_ids) and not _contains(supervised, user_ids)
    assert _contains(supervised, out_ids)
    assert _contains(supervised, table.image_start + out_image)
    assert _contains(ids, table.image_start + user_image) and not _contains(supervised, table.image_start + user_image)
    system = tok.decode(ids[: list(ids).index(tok.convert_tokens_to_ids("<|im_end|>"))])
    assert SYSTEM_SPEECH in system  # speech generation: MIO's speech-only system prompt


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    n = len(needle)
    return any(np.array_equal(haystack[i:i + n], needle) for i in range(len(haystack) - n + 1))


# --- the family recipes ----------------------------------------------------------------------------
def test_every_family_has_a_recipe_that_prepares_and_renders(sft):
    out, manifests = sft
    assert set(manifests) == FAMILIES
    _, tok, table = load_backbone(out / "ext")
    renderer = TrainingRenderer(tok, table)
    for family, manifest in manifests.items():
        rows = (RECIPES / "samples" / f"{family}.jsonl").read_text().splitlines()
        assert manifest["samples"] == len(rows) >= 2 and manifest["skipped"] == {}, family
        for sample in stored(out / "data" / "sft_tasks" / family):
            assert sample.task == family
            segs = render_chat(sample.turns, task=sample.task)
            assert segs[1].text == (SYSTEM_SPEECH if family in SPEECH_ONLY_TASKS else SYSTEM_STANDARD)
            rendered = renderer(sample, SFT_SPEC, random.Random(0))
            assert (rendered.labels != -100).sum() > 0
    speech_out = [t.content for s in stored(out / "data" / "sft_tasks" / "tts") for t in s.turns if t.role == "assistant"]
    assert all(isinstance(c[0], Speech) and np.asarray(c[0].codes).shape[0] == 4 for c in speech_out)


def test_sft_stages_mix_every_family():
    config = full_lora_stage()
    datasets = config["data"]["datasets"]
    assert {d["path"] for d in datasets} == {f"sft_tasks/{f}" for f in FAMILIES}
    assert all(d["format"] == "sft" and d["weight"] > 0 for d in datasets)
    assert config["model"]["lora"]["train_new_tokens"] is True
    # The tiny twin reads stage 1's pairs as conversations of SFT families.
    tiny = yaml.safe_load((ROOT / "stages" / "tiny" / "4_sft_lora.yaml").read_text())
    assert {d["path"] for d in tiny["data"]["datasets"]} == {"image_text", "speech_text"}
    assert all(d["format"] == "sft" and d["tasks"] for d in tiny["data"]["datasets"])
    assert tiny["model"]["lora"]["train_new_tokens"] is True


def test_bad_conversations_are_skipped_with_counted_reasons(tmp_path):
    cat = str(ROOT / "data_recipes" / "samples" / "images" / "cat.jpg")
    user, answer = {"role": "user", "content": [{"text": "Hi"}]}, {"role": "assistant", "content": [{"text": "Hello"}]}
    rows = [
        {"messages": [{"role": "user", "content": [{"image": cat}, {"text": "What is it?"}]}, answer]},
        {"messages": [user]},  # no assistant turn
        {"messages": [user, {"role": "assistant", "content": [{"text": "  "}]}]},  # empty assistant content
        {"messages": [answer, user]},  # roles out of order
        {"messages": [user, {"role": "narrator", "content": "Meanwhile..."}]},  # unknown role
        {"messages": [{"role": "user", "content": [{"image": "images/missing.jpg"}]}, answer]},  # missing media
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bad.yaml").write_text("data_type: sft\ninput: rows.jsonl\ntokenizers: {image: seed.yaml}\n")
    manifest = prepare(tmp_path / "bad.yaml", tmp_path / "out", tokenizer_dir=TOKENIZERS)
    assert manifest["samples"] == 1
    assert manifest["skipped"] == {"bad_conversation": 4, "missing_file": 1}
    details = sorted(e["detail"] for e in manifest["skipped_examples"])
    for line, why in ((2, "no assistant turn"), (3, "empty content"), (4, "expected 'user'"), (5, "unknown role")):
        assert any(f"rows.jsonl:{line}" in d and why in d for d in details), (line, why, details)
    assert any(d.startswith("rows.jsonl:6: ") and "images/missing.jpg does not exist" in d for d in details), details


# --- a LoRA SFT stage ------------------------------------------------------------------------------
class FrozenBaseCheck(L.Callback):
    """Snapshots every parameter when fit starts and compares when it ends (results on the class:
    the stage runs inside LightningCLI, which builds this callback from its class path)."""

    results: dict[str, list[str]] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        after = dict(pl_module.named_parameters())
        same = {n for n, p in self.before.items() if torch.equal(p, after[n].detach())}
        FrozenBaseCheck.results = {
            "frozen": sorted(n for n, p in after.items() if not p.requires_grad),
            "frozen_changed": sorted(n for n, p in after.items() if not p.requires_grad and n not in same),
            "trainable_changed": sorted(n for n, p in after.items() if p.requires_grad and n not in same),
            "trainable": sorted(n for n, p in after.items() if p.requires_grad)}


def full_lora_stage() -> dict:
    return yaml.safe_load((ROOT / "stages" / "4_sft_lora.yaml").read_text())


def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], **packed_attention_kwargs("sdpa", b)).logits[:, :-1]
            targets = b["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


def test_lora_sft_stage_lowers_the_loss_and_keeps_the_base(sft, capfd):
    from peft import PeftModel

    out, _ = sft
    ext = out / "ext"
    # The tiny stage's settings over the full stage's mixture of the 16 task families.
    families = out / "families.yaml"
    families.write_text(yaml.safe_dump({"data": {"datasets": full_lora_stage()["data"]["datasets"]}}))
    assert main(["fit", "--config", str(ROOT / "stages" / "tiny" / "4_sft_lora.yaml"), "--config", str(families),
                 f"--model.backbone={ext}",
                 f"--data.root={out / 'data'}", f"--trainer.default_root_dir={out / 'run'}", "--trainer.max_steps=12",
                 "--data.batch_size=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--trainer.callbacks+=test_sft.FrozenBaseCheck"]) == 0
    printed = capfd.readouterr()
    adapter = Path(printed.out.strip().splitlines()[-1])  # `mio fit` ends with the adapter folder
    assert adapter == out / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ext.resolve()) and config["r"] == 8
    assert "[mio] parameters:" in printed.err and "added-token rows" in printed.err

    check = FrozenBaseCheck.results
    base, _, table = load_backbone(ext)
    assert len(check["frozen"]) == len(list(base.parameters()))  # every base tensor stayed frozen...
    assert check["frozen_changed"] == []  # ...and bit-identical
    assert check["trainable_changed"] == check["trainable"] and any("lora_" in n for n in check["trainable"])

    stage = yaml.safe_load((ROOT / "stages" / "tiny" / "4_sft_lora.yaml").read_text())
    data = MioDataModule([DatasetSpec(**d) for d in full_lora_stage()["data"]["datasets"]], root=str(out / "data"),
                         context_length=stage["data"]["context_length"], batch_size=1, backbone=str(ext), seed=1)
    data.setup("fit")
    batches = [b for _, b in zip(range(4), data.train_dataloader())]
    before = mean_loss(base.eval(), batches)
    tuned = PeftModel.from_pretrained(load_backbone(ext)[0], adapter).eval()
    after = mean_loss(tuned, batches)
    assert after < before - 0.5, (before, after)
