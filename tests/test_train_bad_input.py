"""Bad stage input fails with a clear error before any training step: an unknown key or a wrong type
in the stage YAML, a data glob matching nothing, data tokenized for another vocabulary, a starting
point or checkpoint whose vocabulary table differs, a context above the backbone's positions, a
resume with another global batch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from train_support import ROOT, ledger, shared_root, tiny_args, tiny_base

from mio.cli import main
from mio.train.cli import fit

pytestmark = pytest.mark.slow  # each test trains a stage to refuse it

CHECKPOINTED = ("--checkpoint.every_n_train_steps=1", "--trainer.callbacks+=mio.train.callbacks.SampleLedger")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return shared_root(tmp_path_factory)


def stage_yaml(tmp_path: Path, edit) -> str:  # noqa: ANN001 (a function editing the parsed YAML)
    config = yaml.safe_load((ROOT / "stages" / "tiny" / "1_alignment.yaml").read_text())
    edit(config)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def fails_to_parse(args: list[str], capsys) -> str:  # noqa: ANN001
    """What `mio fit` prints for a stage that does not parse: one line, no usage text."""
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and err.startswith("[mio] error: ")
    return err


def test_unknown_key_in_the_stage_yaml(root, tmp_path, capsys):
    config = stage_yaml(tmp_path, lambda c: c["model"].update(lrr=1e-3))
    err = fails_to_parse(tiny_args(root, tmp_path / "run", "--config", config), capsys)
    assert err.strip() == f"[mio] error: in {config}: model.lrr is not a setting of a stage (did you mean model.lr?)"
    assert not (tmp_path / "run").exists()
    err = fails_to_parse(tiny_args(root, tmp_path / "run", "--trainer.max_stpes=3"), capsys)
    assert "in the command line: trainer.max_stpes is not a setting of a stage (did you mean trainer.max_steps?)" in err


def test_wrong_type_in_the_stage_yaml(root, tmp_path, capsys):
    config = stage_yaml(tmp_path, lambda c: c["data"].update(batch_size="two"))
    err = fails_to_parse(tiny_args(root, tmp_path / "run", "--config", config), capsys)
    assert f"in {config}: data.batch_size:" in err and "two" in err
    # The value that won came from the command line, after the file.
    err = fails_to_parse(tiny_args(root, tmp_path / "run", "--data.batch_size=three"), capsys)
    assert "in the command line: data.batch_size:" in err and "three" in err


def test_backbone_without_mios_tokens_says_how_to_extend_it(root, tmp_path):
    with pytest.raises(ValueError, match="model.extend_vocab: true"):
        fit(tiny_args(root, tmp_path, "--model.extend_vocab=false"))


def test_a_backbone_folder_that_is_not_there_says_what_to_give(root, tmp_path, capsys):
    missing = tmp_path / "no-model"
    assert main(["fit", *tiny_args(root, tmp_path, f"--model.backbone={missing}")]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: not a model folder (no config.json)" in err and "model.backbone" in err
    assert f"mio tiny-base PREPARED_DATA_DIR --out {missing}" in err


def test_data_glob_matching_nothing(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.datasets entry 'image_txt/\*.tar'.*neither"):
        fit(tiny_args(root, tmp_path, "--data.datasets=[{path: image_txt/*.tar}]"))
    assert not (tmp_path / "ledger").exists()


def test_context_above_the_backbones_positions(root, tmp_path):
    with pytest.raises(ValueError, match="context_length 2048 .*max_position_embeddings 1024"):
        fit(tiny_args(root, tmp_path, context=2048))


def with_tokenizer_spec(root: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    """A copy of the image_text dataset whose manifest names an edited tiny SEED spec."""
    data = tmp_path / "data"
    shutil.copytree(root / "data" / "image_text", data / "image_text")
    spec = yaml.safe_load((ROOT / "tokenizers" / "tiny" / "seed.yaml").read_text())
    edit(spec)
    spec_path = tmp_path / "seed.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    manifest = json.loads((data / "image_text" / "manifest.json").read_text())
    manifest["tokenizers"]["image"] = {"path": str(spec_path), "sha256": hashlib.sha256(spec_path.read_bytes()).hexdigest()}
    (data / "image_text" / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_data_tokenized_for_another_vocabulary(root, tmp_path):
    data = with_tokenizer_spec(root, tmp_path, lambda s: s["model"].update(codebook_size=4096))
    with pytest.raises(ValueError, match="vocabulary table mismatch.*image_codebook_size 4096.*has 8192"):
        fit(tiny_args(root, tmp_path / "run", f"--data.root={data}", "--data.datasets=[{path: image_text}]"))


def test_starting_point_trained_with_another_image_tokenizer(root, tmp_path):
    start = fit(tiny_args(root, tmp_path / "s1", "--data.datasets=[{path: image_text}]", steps=1))
    data = with_tokenizer_spec(root, tmp_path, lambda s: s.update(seed=1))  # same sizes, other weights
    with pytest.raises(ValueError, match="image tokenizer of this stage's data .* differs"):
        fit(tiny_args(root, tmp_path / "s2", f"--data.root={data}", f"--model.backbone={start}",
                      "--data.datasets=[{path: image_text}]", config="2_interleaved.yaml"))


def test_resuming_with_another_vocabulary_table_or_global_batch(root, tmp_path):
    run = tmp_path / "run"
    fit(tiny_args(root, run, *CHECKPOINTED, steps=1))
    before = (run / "checkpoints" / "last.ckpt").resolve().read_bytes()
    other = tiny_base(tmp_path / "other_base", text_vocab_size=280)
    with pytest.raises(ValueError, match="another vocabulary table"):
        fit(tiny_args(root, run, *CHECKPOINTED, f"--model.backbone={other}", "--ckpt_path=last", steps=2))
    with pytest.raises(ValueError, match="cannot resume to the sample: the checkpoint's data rows is 2, this run's is 3"):
        fit(tiny_args(root, run, *CHECKPOINTED, "--data.batch_size=3", "--ckpt_path=last", steps=2))
    # Nothing trained: the checkpoint and the ledger are those of the first run.
    assert (run / "checkpoints" / "last.ckpt").resolve().read_bytes() == before
    assert [line["step"] for line in ledger(run)] == [1]
