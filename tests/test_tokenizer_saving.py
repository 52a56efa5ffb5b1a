"""The saved tokenizer is the trained tokenizer: a stage's output folder, loaded by vanilla
``AutoTokenizer`` in a fresh process (as the next stage, `mio generate` and a serving stack load it),
gives exactly the ids the stage trained on, on every tokenizer kind of the parity suite and on a
SentencePiece Llama tokenizer with ``legacy`` true, false and unset (tests/tokenizer_kinds.py).

The training ids come from the extending stage's own tokenizer (load_backbone(extend=True), rendered by
SegmentRenderer); the reference is ``tokenizer(text_form)`` of the reloaded one, in another process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tokenizer_kinds
from transformers import LlamaConfig, LlamaForCausalLM

from mio.cli import main as mio_main
from mio.model import saved_tokenizer
from mio.model.backbone import load_backbone, save_model_folder
from mio.model.saved_tokenizer import TokenizerDriftError, folder_report
from mio.segments import Image, SegmentRenderer, Speech, Text, Video, text_form
from mio.templates import Turn, render_chat
from mio.vocab import VocabTable

KINDS = tuple(dict.fromkeys((*tokenizer_kinds.KINDS, *tokenizer_kinds.SENTENCEPIECE_KINDS)))
IMAGE = Image(np.arange(32) % 64)
SPEECH = Speech(np.arange(12).reshape(1, 12))


def pretraining_samples() -> list[list]:
    """Media then text, text then media, text right after a block with and without a space or newline."""
    return [[IMAGE, Text("The caption of this image is: a red rocket")],
            [Text("a photo of"), IMAGE, Text("\nnext paragraph über 東京")],
            [IMAGE, Text("no space after the block")],
            [Text("hello world "), SPEECH, Text(" привет")],
            [Video(np.stack([np.arange(32), np.arange(32)[::-1]]) % 64), Text("\n\ndescribe the video")],
            [Text("plain text only: café naïve 데이터 🚀")]]


def conversations() -> list[list[Turn]]:
    return [[Turn("user", [Text("what is in the picture?"), IMAGE]), Turn("assistant", [Text("a red cat")])],
            [Turn("system", [Text("You are a helpful assistant.")]), Turn("user", [Text("say hello")]),
             Turn("assistant", [Text("hello"), SPEECH]), Turn("user", [Text("\nagain, in 東京 style")]),
             Turn("assistant", [Text(" sure: "), IMAGE])]]


def samples() -> list[tuple[str, list]]:
    """(what, segments): pretraining samples, ChatML conversations, generation prompts (`mio generate`'s)."""
    out = [(f"pretraining {i}", s) for i, s in enumerate(pretraining_samples())]
    out += [(f"conversation {i}", render_chat(t)) for i, t in enumerate(conversations())]
    out += [(f"generation prompt {i}", render_chat(t[:-1], add_generation_prompt=True))
            for i, t in enumerate(conversations())]
    return out


def base_folder(kind: str, root: Path) -> Path:
    """A text-only backbone folder as a user has one: the kind's tokenizer files and a tiny Llama."""
    folder = root / f"{kind}-base"
    if kind in tokenizer_kinds.SENTENCEPIECE_KINDS:  # tokenizer.model + tokenizer_config.json, as Llama 2 ships
        tokenizer_kinds.sentencepiece_folder(folder, legacy=tokenizer_kinds.SENTENCEPIECE_KINDS[kind])
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    else:
        tok = tokenizer_kinds.build(kind, root)
        tok.save_pretrained(folder)
        size = len(tok)
    config = LlamaConfig(vocab_size=size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


RELOAD = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    jobs = json.load(open(sys.argv[1]))
    out = {}
    for folder, texts in jobs.items():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        out[folder] = {"ids": [tok(t)["input_ids"] for t in texts], "legacy": getattr(tok, "legacy", None)}
    print(json.dumps(out))
""")


def reload_in_fresh_process(jobs: dict[str, list[str]], tmp: Path) -> dict[str, dict]:
    """{folder: texts} -> {folder: {"ids": the reloaded tokenizer's ids of each text, "legacy": ...}},
    computed by vanilla transformers in a new Python process."""
    job_file = tmp / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", RELOAD, str(job_file)], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Per kind: the extending stage's training ids of every sample, its saved folder, and the ids the
    folder's tokenizer gives in a fresh process."""
    root = tmp_path_factory.mktemp("saving")
    trained, jobs = {}, {}
    for kind in KINDS:
        model, tok, table = load_backbone(base_folder(kind, root), extend=True)
        renderer = SegmentRenderer(tok, table)
        rows = [(what, text_form(segs, table), renderer(segs).input_ids.tolist()) for what, segs in samples()]
        out = save_model_folder(model, tok, table, root / f"{kind}-stage")
        trained[kind] = (str(out), rows, getattr(tok, "legacy", None))
        jobs[str(out)] = [text for _, text, _ in rows]
    reloaded = reload_in_fresh_process(jobs, root)
    return {kind: (rows, legacy, reloaded[out]) for kind, (out, rows, legacy) in trained.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_saved_folder_tokenizes_as_the_stage_trained(stages, kind):
    rows, legacy, reloaded = stages[kind]
    for (what, text, ids), again in zip(rows, reloaded["ids"]):
        assert ids == again, f"{kind} {what}: {text!r}"
    assert reloaded["legacy"] == legacy  # the setting that was lost (transformers 5.25: LlamaTokenizer's legacy)


@pytest.mark.slow
def test_a_setting_save_pretrained_drops_is_an_error_naming_it(tmp_path, monkeypatch):
    """Saved as transformers alone saves it, a legacy Llama tokenizer reloads with legacy=False: extending
    stops with an error that names the setting, never a silent drift."""
    base = base_folder("sentencepiece_legacy", tmp_path)
    monkeypatch.setattr(saved_tokenizer, "save_tokenizer", lambda tok, out: tok.save_pretrained(out))
    with pytest.raises(TokenizerDriftError, match=r"legacy: true when trained, false when reloaded") as e:
        load_backbone(base, extend=True)
    said = str(e.value)  # the pre-tokenizer behind it, and a probe text as both token lists
    assert '"prepend_scheme": "always"' in said and '"prepend_scheme": "first"' in said and "but reloads as" in said


@pytest.mark.slow
def test_inspect_reports_a_folder_saved_before_the_fix(tmp_path, monkeypatch, capsys):
    """`mio inspect MODEL_DIR`: a folder written as transformers alone writes it is reported with the
    setting that repairs it; written by mio, or repaired, it agrees; a table at the wrong ids is reported."""
    model, tok, table = load_backbone(base_folder("sentencepiece_legacy", tmp_path), extend=True)
    good = save_model_folder(model, tok, table, tmp_path / "good")
    assert mio_main(["inspect", str(good)]) == 0
    assert "tokenizer: agrees" in capsys.readouterr().out

    with monkeypatch.context() as m:  # today's save: tokenizer.save_pretrained alone
        m.setattr("mio.model.backbone.save_tokenizer", lambda t, out: t.save_pretrained(out))
        old = save_model_folder(model, tok, table, tmp_path / "old")
    assert "legacy" not in json.loads((old / "tokenizer_config.json").read_text())
    assert mio_main(["inspect", str(old)]) == 1
    said = capsys.readouterr().out
    assert "pre_tokenizer" in said and "loaded with legacy=True, it agrees" in said
    config = json.loads((old / "tokenizer_config.json").read_text())  # the repair the report names
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    assert folder_report(old)[1] == []

    assert table == VocabTable.mio_default(table.text_size)
    VocabTable.mio_default(table.text_size + 1).save(good)  # a table one id off the tokenizer and the model
    problems = folder_report(good)[1]
    assert len(problems) == 2 and f"{table.num_added} of {table.num_added} added tokens" in problems[0]
    assert f"vocab_size {table.total_size} is smaller than the table's {table.total_size + 1}" in problems[1]
