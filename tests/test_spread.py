"""`mio generate --prompts` and `mio eval` under torchrun on 2 CPU processes (gloo): the batches are
spread over the ranks and the files are those one process writes (timings aside), byte for byte:
answers' generation.json, transcripts and decoded media; generations.jsonl, metrics.json, report.html.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_generate_support import ROOT, save_media_model

from mio.data.ranks import Ranks
from mio.data.shards import AtomicShardWriter, StoredSample
from mio.generate.spread import Spread
from mio.segments import Image, Speech, Text
from mio.templates import Turn

RNG = np.random.default_rng(0)
TIMINGS = re.compile(r'("seconds": |"tokens_per_second": |- seconds: |- tokens_per_second: |<td>seconds</td><td>|'
                     r'<td>tokens_per_second</td><td>|items in )[0-9.]+')


def run(args: list[str], ranks: int, out: Path) -> str:
    """`mio ARGS` in fresh processes: one, or ``ranks`` under torchrun; its standard output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks > 1 else [sys.executable])
    done = subprocess.run([*launch, "-m", "mio.cli", *args], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, timings blanked in the text ones."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.suffix in (".json", ".jsonl", ".md", ".html"):
                data = TIMINGS.sub(lambda m: m.group(1) + "T", data.decode()).encode()
            out[str(p.relative_to(folder))] = data
    return out


def test_batches_go_round_robin_and_gather_in_order():
    spreads = [Spread(Ranks(r, 3, r)) for r in range(3)]
    assert [s.batches(7) for s in spreads] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Spread(Ranks(0, 1, 0)).gather([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]


@pytest.mark.slow
def test_generate_prompts_on_two_ranks_writes_what_one_process_writes(tmp_path):
    model = save_media_model(tmp_path / "model", seed=11, image_bias=5.0, speech_bias=4.6)
    prompts = tmp_path / "prompts.jsonl"
    lines = ["a cat sitting on a mat", "hello world", "please generate an image of a cat", "transcribe this speech",
             "You are MIO"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    args = ["generate", "--model", str(model), "--prompts", str(prompts), "--batch-size", "2", "--max-new-tokens", "50",
            "--max-speech-frames", "3", "--steps", "1", "--set", "text.num_beams=1", "--seed", "3"]
    one = run([*args, "--out", str(tmp_path / "one")], 1, tmp_path)
    two = run([*args, "--out", str(tmp_path / "two")], 2, tmp_path)
    assert two.replace(str(tmp_path / "two"), "OUT") == one.replace(str(tmp_path / "one"), "OUT")
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(a) == sorted(b) and len([k for k in a if k.endswith("generation.json")]) == len(lines)
    assert {Path(k).suffix for k in a} & {".png", ".wav"}, sorted(a)  # decoded media, compared byte for byte
    assert {k: v.replace(b"/two/", b"/one/") for k, v in b.items()} == a


def eval_set(folder: Path) -> Path:
    cat, dog = Image(RNG.integers(0, 8192, 32)), Image(RNG.integers(0, 8192, 32))
    clip = Speech(RNG.integers(0, 1024, (4, 12)))
    samples = [StoredSample(f"c{i}", "sft", turns=[Turn("user", [img, Text(f"Describe this image {i}.")]),
                                                   Turn("assistant", [Text("a cat on a mat")])], task="image_captioning")
               for i, img in enumerate([cat, dog, cat])]
    samples += [StoredSample("a0", "sft", turns=[Turn("user", [clip, Text("Transcribe this speech.")]),
                                                 Turn("assistant", [Text("hello world")])], task="asr"),
                StoredSample("g0", "sft", turns=[Turn("user", [Text("a cat")]), Turn("assistant", [cat])],
                             task="image_generation")]
    folder.mkdir(parents=True)
    with AtomicShardWriter(folder / "eval-00000.tar") as w:
        for s in samples:
            w.write(s)
    return folder


@pytest.mark.slow
def test_eval_on_two_ranks_writes_what_one_process_writes(tmp_path):
    model = save_media_model(tmp_path / "model", seed=3, image_bias=6.0, speech_bias=6.0)
    data = eval_set(tmp_path / "data")
    args = ["eval", str(model), "--data", str(data), "--tasks", "image_captioning,asr,image_generation",
            "--max-new-tokens", "24", "--batch-size", "2", "--set", "all.num_beams=1", "--set", "all.do_sample=false"]
    one = json.loads(run([*args, "--out", str(tmp_path / "one")], 1, tmp_path).strip().splitlines()[-1])
    two = json.loads(run([*args, "--out", str(tmp_path / "two")], 2, tmp_path).strip().splitlines()[-1])
    assert {**one, "seconds": 0} == {**two, "seconds": 0}
    assert one["tasks"]["image_captioning"]["items"] == 3
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(a) == ["generations.jsonl", "metrics.json", "report.html"] and a == b
