"""`mio eval` end to end on a random tiny model: every task family over SFT and pair data,
the outputs it writes, and its scores checked against the metrics recomputed from what it
wrote (the metrics themselves are checked by hand in test_eval_metrics.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from eval_support import tiny_clip_folder, tiny_whisper_folder
from test_generate_support import one_thread, save_media_model  # noqa: F401 (autouse fixture)

from mio.cli import main
from mio.data.shards import AtomicShardWriter, StoredSample
from mio.eval.metrics import ClipScorer, caption_scores, vqa_accuracy, word_error_rates
from mio.eval.tasks import read_eval_set
from mio.segments import Image, Speech, Text
from mio.templates import Turn

RNG = np.random.default_rng(0)
CAT, DOG = Image(RNG.integers(0, 8192, 32)), Image(RNG.integers(0, 8192, 32))
CLIP = Speech(RNG.integers(0, 1024, (4, 12)))


def sft(key: str, task: str, user: list, answer: list) -> StoredSample:
    return StoredSample(key, "sft", turns=[Turn("user", user), Turn("assistant", answer)], task=task)


def write_shard(folder: Path, samples: list[StoredSample]) -> Path:
    with AtomicShardWriter(folder / "eval-00000.tar") as w:
        for s in samples:
            w.write(s)
    return folder


@pytest.fixture(scope="module")
def evalset(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("evalset")
    describe = Text("Describe this image.")
    chat = write_shard(root / "chat", [
        sft("c0", "image_captioning", [CAT, describe], [Text("a tabby cat on a mat")]),
        sft("c1", "image_captioning", [CAT, describe], [Text("a cat sitting on a mat")]),  # same prompt: 2 references
        sft("c2", "image_captioning", [DOG, describe], [Text("a dog in the park")]),
        sft("q0", "image_qa", [DOG, Text("What animal is this?")], [Text("A dog.")]),
        sft("a0", "asr", [CLIP, Text("Transcribe this speech.")], [Text("hello world")]),
        sft("g0", "image_generation", [Text("a cat")], [CAT]),
        sft("h0", "chat", [Text("hello")], [Text("hello world")]),
    ])
    pairs = write_shard(root / "speech_text", [StoredSample("p0", "speech_text", [CLIP, Text("a red car")]),
                                               StoredSample("p1", "speech_text", [CLIP, Text("uh")])])
    return [chat, pairs]


def test_items_group_references_and_serve_pair_tasks(evalset):
    es = read_eval_set(evalset, ["image_captioning", "tts", "asr", "video_understanding"])
    caps = [i for i in es.items if i.task == "image_captioning"]
    assert [len(i.references) for i in caps] == [2, 1]
    assert caps[0].keys == ["chat/c0", "chat/c1"] and caps[0].reference_texts() == ["a tabby cat on a mat",
                                                                                       "a cat sitting on a mat"]
    tts = [i for i in es.items if i.task == "tts"]
    assert [i.condition for i in tts] == ["a red car", "uh"]
    assert tts[0].references[0][0] == CLIP  # the pair's speech, all layers, is the reference answer
    # the two pairs share their speech: one ASR item with two references (and the SFT sample's)
    assert [len(i.references) for i in es.items if i.task == "asr"] == [1, 2]
    assert es.missing == ["video_understanding"]
    assert es.available["chat"] == 1 and es.available["tts"] == 2
    assert len(read_eval_set(evalset, ["image_captioning"], limit=1).items) == 1
    with pytest.raises(ValueError, match=r"no sample of the tasks \['video_generation'\].*image_captioning \(3\)"):
        read_eval_set(evalset, ["video_generation"])


def test_mio_eval_scores_every_task(evalset, tmp_path, capsys):
    model = save_media_model(tmp_path / "model", seed=3, image_bias=6.0, speech_bias=6.0)
    asr, clip = tiny_whisper_folder(tmp_path / "whisper", says="a"), tiny_clip_folder(tmp_path / "clip")
    out = tmp_path / "eval"
    tasks = "image_captioning,image_qa,asr,tts,image_generation,chat"
    code = main(["eval", str(model), "--data", *map(str, evalset), "--tasks", tasks, "--out", str(out),
                 "--max-new-tokens", "40", "--batch-size", "3", "--asr-model", str(asr), "--clip-model", str(clip),
                 "--set", "all.num_beams=1", "--set", "all.do_sample=false", "--steps", "1"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    by_task = {t: [r for r in rows if r["task"] == t] for t in tasks.split(",")}
    assert {t: m["items"] for t, m in metrics["tasks"].items()} == {t: len(r) for t, r in by_task.items()} == {
        "image_captioning": 2, "image_qa": 1, "asr": 2, "tts": 2, "image_generation": 1, "chat": 1}
    for task, figures in metrics["tasks"].items():
        assert figures["exact"] == np.mean([r["scores"]["exact"] for r in by_task[task]])
    cap = by_task["image_captioning"]
    corpus, _ = caption_scores([r["references"] for r in cap], [r["answer_text"] for r in cap])
    assert metrics["tasks"]["image_captioning"]["cider"] == pytest.approx(corpus["cider"])
    assert metrics["tasks"]["image_captioning"]["bleu4"] == pytest.approx(corpus["bleu4"])
    q = by_task["image_qa"][0]
    assert metrics["tasks"]["image_qa"]["vqa_accuracy"] == vqa_accuracy(q["answer_text"], ["A dog."])
    wer, _ = word_error_rates([r["references"][0] for r in by_task["asr"]], [r["answer_text"] for r in by_task["asr"]])
    assert metrics["tasks"]["asr"]["wer"] == pytest.approx(wer)
    # TTS: the tiny Whisper hears "a" in any speech: "a red car" -> 2 deletions of 3 words. The
    # reference "uh" is empty after Whisper's normalization: counted, not scored.
    tts = by_task["tts"]
    assert tts[0]["media"] and tts[0]["transcript"] == "a" and tts[0]["scores"]["tts_wer"] == pytest.approx(2 / 3)
    assert (out / tts[0]["media"][0]).suffix == ".wav" and sf.info(str(out / tts[0]["media"][0])).frames > 0
    assert metrics["tasks"]["tts"]["tts_wer"] == pytest.approx(2 / 3)
    assert metrics["tasks"]["tts"]["tts_wer_unscored"] == 1.0 and "not scored" in tts[1]["note"]
    # Image generation: CLIP score of the decoded image against the prompt's text.
    g = by_task["image_generation"][0]
    from PIL import Image as PILImage

    expected = ClipScorer(clip)([PILImage.open(out / g["media"][0]).convert("RGB")], ["a cat"])[0]
    assert metrics["tasks"]["image_generation"]["clip_score"] == pytest.approx(expected, abs=1e-4)
    html = (out / "report.html").read_text()
    assert all(name in html for name in ("cider", "bleu4", "vqa_accuracy", "wer", "tts_wer", "clip_score"))


def test_eval_names_what_it_cannot_do(evalset, tmp_path, capsys):
    model = save_media_model(tmp_path / "model", seed=3)
    args = ["eval", str(model), "--data", *map(str, evalset), "--out", str(tmp_path / "e"), "--max-new-tokens", "4"]
    assert main(args + ["--tasks", "tts", "--asr-model", str(tmp_path / "none")]) == 2
    assert "--asr-model" in capsys.readouterr().err
    assert main(args + ["--tasks", "image_generation,image_qa", "--limit", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["not_computed"] == {"image_generation/clip_score": "needs --clip-model (a local CLIP folder)"}
    assert main(["eval", str(model), "--data", str(tmp_path / "missing"), "--tasks", "asr", "--out", "x"]) == 2
    assert "--data" in capsys.readouterr().err
