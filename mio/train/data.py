"""The one DataModule of every stage: a token-balanced mixture of prepared datasets, packed, in a
global row order that resumes to the sample (see :mod:`mio.data.pipeline`); and the stage's data
report: what it trained on and what reading lost, per dataset and reason."""

from __future__ import annotations

import glob
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import numpy as np
import yaml
from transformers import AutoTokenizer

from mio.data.pipeline import RankBatches, RankRows
from mio.data.reading import ERROR_REASONS, DataCounts, DatasetSpec, Mixture, ReaderSlot, error_summary
from mio.data.shards import list_shards, read_manifest, write_json_atomic
from mio.log import info
from mio.templates import template_set
from mio.train.validation import ValBatches, hold_out
from mio.userio import MioUserError
from mio.vocab import MODALITY_NAMES, LocationTokens, VocabTable, extend_tokenizer, folder_table, is_extended

DATA_REPORT = "mio_data_report.json"
# A dataset is held to data.max_error_fraction once it has lost this many samples: one damaged
# shard met first is not yet a trend.
MIN_ERRORS_TO_STOP = 10
WHAT_TO_DO = {"shard_unreadable": "Make its shards readable (or re-prepare them)",
              "shard_truncated": "Re-prepare or re-download its damaged shards (`mio inspect --verify` lists them)",
              "bad_sample": "Re-prepare the dataset: its samples do not decode",
              "render_failed": "Prepare the dataset with the tokenizers of the backbone's vocabulary",
              "over_context": "Raise data.context_length, or drop the long samples when preparing"}


class DataError(MioUserError):
    """A dataset lost more than ``data.max_error_fraction`` of its samples; names dataset, reason, example."""


class DataReport:
    """What a stage trained on and what reading lost, per dataset and reason, summed over ranks.

    Each rank adds its micro-batches' :class:`DataCounts` (:meth:`add`); at a logged step the
    training loop sums :meth:`local_vector` over ranks, in the same reduction as its own
    figures, and hands the sum to :meth:`log`, which returns the step's metrics and stops the
    stage past ``max_error_fraction``. :meth:`close` gives the closing summary and writes
    ``mio_data_report.json``.
    """

    def __init__(self, names: Sequence[str], max_error_fraction: float, out_dir: str | Path) -> None:
        self.names, self.max_error_fraction, self.out_dir = list(names), max_error_fraction, Path(out_dir)
        self.local = DataCounts(len(self.names))  # this rank, since the last logged step
        self.total = DataCounts(len(self.names))  # all ranks, whole stage, as of the last logged step;
        # its examples: this rank's first example of each error

    def add(self, counts: DataCounts) -> None:
        self.local.add(counts)

    def local_vector(self) -> np.ndarray:
        return self.local.vector()

    def log(self, summed: Sequence[float]) -> dict[str, float]:
        """The metrics of a logged step from ``local_vector`` summed over ranks: token shares of the
        steps since the last logged step, per sample kind (``train/share_<kind>``: the stage
        table's shares) and per dataset (``train/share/<dataset>``); samples read and lost per
        dataset and reason over the whole stage (``data/<dataset>/<reason>``)."""
        window = self._merge(summed)
        real = max(int(window.tokens.sum()), 1)
        metrics = {f"train/share_{name}": window.kind_tokens[m] / real for m, name in MODALITY_NAMES.items()}
        for d, name in enumerate(self.names):
            metrics[f"train/share/{name}"] = window.tokens[d] / real
            if self.total.cond[d, 0]:  # condition dropout: the share of the window's generation samples dropped
                metrics[f"train/cond_dropped/{name}"] = (window.cond[d, 1] / window.cond[d, 0] if window.cond[d, 0]
                                                         else float("nan"))
            metrics[f"data/{name}/read"] = float(self.total.read[d])
            for r, reason in enumerate(ERROR_REASONS):
                metrics[f"data/{name}/{reason}"] = float(self.total.errors[d, r])
        self.check()
        return metrics

    def _merge(self, summed: Sequence[float]) -> DataCounts:
        """The counts of all ranks since the last merge (``summed``) join the totals; returns them."""
        window = self.local.from_vector(summed)  # with this rank's examples
        self.local = DataCounts(len(self.names))
        self.total.add(window)
        return window

    def check(self) -> None:
        """Stop the stage (:class:`DataError`) when a dataset lost more than ``max_error_fraction``
        of the samples it read (and at least ``MIN_ERRORS_TO_STOP``)."""
        for d, name in enumerate(self.names):
            lost = int(self.total.errors[d].sum())
            if lost >= MIN_ERRORS_TO_STOP and lost > self.max_error_fraction * max(int(self.total.read[d]), 1):
                self.write()
                worst = ERROR_REASONS[int(np.argmax(self.total.errors[d]))]
                raise DataError(f"dataset {name} lost {lost} of the {int(self.total.read[d])} samples it read, over "
                                f"data.max_error_fraction={self.max_error_fraction}: {self._summary(d)}. "
                                f"{WHAT_TO_DO[worst]}, or raise data.max_error_fraction; the counts are in "
                                f"{self.out_dir / DATA_REPORT}")

    def _summary(self, d: int) -> str:
        return error_summary(self.total, d)

    def as_dict(self) -> dict[str, Any]:
        def dataset(d: int) -> dict[str, Any]:
            return {"samples_read": int(self.total.read[d]), "tokens_trained": int(self.total.tokens[d]),
                    "errors": {r: int(n) for r, n in zip(ERROR_REASONS, self.total.errors[d])},
                    "examples": {ERROR_REASONS[r]: example for (i, r), example in sorted(self.total.examples.items())
                                 if i == d}}

        return {"datasets": {name: dataset(d) for d, name in enumerate(self.names)},
                "max_error_fraction": self.max_error_fraction}

    def write(self, folder: Path | None = None) -> Path:
        path = (folder or self.out_dir) / DATA_REPORT
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.as_dict())
        return path

    def close(self, summed: Sequence[float], folders: Sequence[Path] = ()) -> Path:
        """At the end of the stage: the last steps' counts (``local_vector`` summed over ranks) join
        the totals; the closing summary goes to stderr, one line per dataset; the report is
        written to the stage's folder (and to ``folders``). Returns its path."""
        self._merge(summed)
        for d, name in enumerate(self.names):
            info(f"data {name}: {int(self.total.read[d])} samples read, {int(self.total.tokens[d])} tokens "
                 f"trained on; {self._summary(d)}")
        for folder in folders:
            self.write(folder)
        return self.write()


@dataclass
class SkipAhead:
    """``data.skip``: when the run starts at optimizer step ``at_step`` (a fresh start at 0, or a
    resume from that step's checkpoint), skip the next ``batches`` global batches. The data
    position moves past them and checkpoints written after record it, so a later resume (a SLURM
    requeue with the same command) does not skip again. The command a stage prints when it stops
    on a run of skipped steps sets it."""

    at_step: int = 0
    batches: int = 0

    def __post_init__(self) -> None:
        if self.at_step < 0 or self.batches < 0:
            raise MioUserError(f"data.skip: at_step ({self.at_step}) and batches ({self.batches}) must be at least 0")


@dataclass(frozen=True)
class DataLink:
    """What the data module hands the model when the two connect (:meth:`MioDataModule.connect`)."""

    pack: bool  # several samples per row: the model's attention must keep them apart
    specs: dict[str, dict[str, Any]]  # the modality tokenizers the stage's output folder records (checked)
    report: DataReport  # what the stage reads and loses: the training loop feeds it, the output records it
    first_batch: Callable[[], dict[str, Any]]  # the stage's first micro-batch (model.qk_norm calibrates on it)


class MioDataModule(L.LightningDataModule):
    """Micro-batches of ``batch_size`` packs of ``context_length`` tokens per rank.

    ``backbone`` and ``extend_vocab`` are linked from the model's settings by the CLI. The model
    connects to it before fitting (:meth:`connect`: its tokenizer, vocabulary table and limits); a
    data module used alone reads the tokenizer and table from the backbone folder.

    Args:
        datasets: the mixture: prepared dataset folders (or shard globs) under ``root`` with weights
            (shares of the tokens, or of the samples with ``balance: samples``).
        batch_size: packs per rank and micro-batch; the global batch has ``batch_size x world size``
            rows, and that count must stay the same when a run resumes.
        buffer_size: partially filled packs each row stream holds open (best fit). More fill the
            packs better; fewer let what the packer releases follow the mixture's shares sooner
            (the packs it holds are shares not yet released). Measured on the synthetic data of
            `mio bench data`: the tiny SFT mixture (context 1024) filled 96.5% of the capacity with
            64 open packs and 92.7% with 4; the pretraining stage mixtures (context 2800) 99.5%
            and 99.3%, while stage III's first 10 packs were 64.6% speech with 64 and 73.8% with
            4 (target 75%): the pretraining stages set 4.
        shuffle_buffer: samples each row stream shuffles over, per dataset.
        num_workers: DataLoader workers per rank; they must divide ``batch_size``.
        pack: pack several samples into each row (default); ``false`` puts one sample in each row,
            padded: for recurrent and hybrid backbones (Mamba, Jamba, ...), whose packed samples an
            attention mask cannot keep apart (training refuses to pack them).
        val_datasets: held-out datasets to validate on (the same form as ``datasets``), or
        val_fraction: the share of each dataset's shards held out for validation (whole shards,
            the same ones on every run and rank; training never reads them).
        val_packs: packs of ``context_length`` tokens per validation pass: the same packs every
            pass and on any number of processes. Validation runs every
            ``trainer.val_check_interval`` training batches (with ``check_val_every_n_epoch: null``).
        templates: the template set every dataset of the stage is rendered with: ``paper`` (the
            paper's wording) or ``mio-release`` (MIO's released prompts, for training on from MIO).
        cond_dropout: condition dropout for classifier-free guidance, per task family
            (``image_generation``: caption -> image, pretraining and SFT; ``tts``; ``video_generation``):
            the probability that a generation sample's condition is replaced by ``cond_null_text``
            (empty: the template with its condition left empty); drawn from (sample key, epoch, seed),
            so a resumed run and any world size drop the same samples. Default: none. Logged as
            ``train/cond_dropped/<dataset>``; validation keeps every condition.
        max_error_fraction: the share of a dataset's samples that may be lost (damaged shards,
            samples that do not decode or render, media longer than the context) before the stage
            stops with an error naming the dataset, the reason and an example.
        skip: skip global batches past a bad stretch (:class:`SkipAhead`).
    """

    def __init__(self, datasets: list[DatasetSpec], root: str = ".", context_length: int = 2800,
                 batch_size: int = 1, buffer_size: int = 64, pad_to_multiple_of: int = 1, num_workers: int = 0,
                 seed: int = 0, backbone: str = "", extend_vocab: bool = False,
                 location_tokens: LocationTokens | None = None, balance: str = "tokens",
                 shuffle_buffer: int = 256, val_datasets: list[DatasetSpec] | None = None, val_fraction: float = 0.0,
                 val_packs: int = 16, templates: str = "paper", pack: bool = True,
                 max_error_fraction: float = 0.05, cond_dropout: dict[str, float] | None = None,
                 cond_null_text: str = "", skip: SkipAhead | None = None) -> None:
        super().__init__()
        if val_datasets and val_fraction:
            raise MioUserError("give data.val_datasets or data.val_fraction, not both")
        if val_packs < 1:
            raise MioUserError(f"data.val_packs must be positive, got {val_packs}")
        if not datasets:
            raise MioUserError("data.datasets is empty: a stage needs at least one prepared dataset")
        if context_length < 8:
            raise MioUserError(f"data.context_length must be at least 8, got {context_length}")
        if batch_size < 1:
            raise MioUserError(f"data.batch_size must be at least 1, got {batch_size}")
        if balance not in ("tokens", "samples"):
            raise MioUserError(f"data.balance must be 'tokens' or 'samples', got {balance!r}")
        if not 0 <= max_error_fraction <= 1:
            raise MioUserError(f"data.max_error_fraction must be between 0 and 1, got {max_error_fraction}")
        template_set(templates)
        for d in [*datasets, *(val_datasets or [])]:
            if d.templates not in ("paper", templates):
                raise MioUserError(f"dataset {d.path} names template set {d.templates!r}: set data.templates for the "
                                 "whole stage instead")
        self.datasets = [replace(d, templates=templates, cond_dropout=dict(cond_dropout or {}),
                                 cond_null_text=cond_null_text) for d in datasets]
        self.root = root
        self.context_length, self.batch_size, self.buffer_size = context_length, batch_size, buffer_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.backbone, self.extend_vocab = backbone, extend_vocab
        self.location_tokens = LocationTokens.of(location_tokens)
        self.balance, self.shuffle_buffer = balance, shuffle_buffer
        self.val_datasets = [replace(d, templates=templates) for d in val_datasets or []]
        self.val_fraction, self.val_packs = val_fraction, val_packs
        self.pack, self.max_error_fraction = pack, max_error_fraction
        self.skip = skip
        self.mixture: Mixture | None = None
        self.val_mixture: Mixture | None = None
        self.report: DataReport | None = None
        self.tokenizer: Any = None  # the model's, given by connect(); else read from the backbone folder in setup()
        self.table: VocabTable | None = None
        self.pad = pad_to_multiple_of  # pack lengths are multiples of it (the attention backend's too, once connected)
        self.rows = 0  # rows of the global batch (batch_size x world size), set in setup
        self.consumed = 0  # micro-batches this run's position is past: the data position

    # --- what the stage reads ---------------------------------------------------------------
    def dataset_folders(self, spec: DatasetSpec) -> list[Path]:
        """The prepared-dataset folders of one mixture entry: the folder itself, or the folders
        holding the shards a glob matches (each has the manifest of its dataset)."""
        path = Path(self.root) / spec.path
        if path.is_dir():
            list_shards(path)
            return [path]
        shards = sorted(glob.glob(str(path)))
        if not shards:
            raise FileNotFoundError(f"data.datasets entry {spec.path!r}: {path} is neither a prepared dataset "
                                    f"folder nor a glob matching any shard (data.root is {self.root!r})")
        return sorted({Path(s).parent for s in shards})

    def manifests(self) -> dict[str, dict[str, Any]]:
        return {str(folder): read_manifest(folder) for d in self.datasets for folder in self.dataset_folders(d)}

    def tokenizer_specs(self) -> dict[str, dict[str, Any]]:
        """The modality tokenizer specs the datasets were prepared with (one per kind)."""
        specs: dict[str, dict[str, Any]] = {}
        for name, manifest in self.manifests().items():
            for kind, spec in manifest.get("tokenizers", {}).items():
                if kind in specs and specs[kind]["sha256"] != spec["sha256"]:
                    raise MioUserError(f"datasets disagree on the {kind} tokenizer: {specs[kind]['path']} vs "
                                     f"{spec['path']} (dataset {name}); a stage needs one tokenizer per modality")
                specs[kind] = spec
        return specs

    # --- the model's side: one call before fitting ----------------------------------------------
    def connect(self, *, tokenizer: Any, table: VocabTable, max_positions: int | None, pad_multiple: int,
                specs: dict[str, dict[str, Any]], stage_dir: str | Path) -> DataLink:
        """Take the model's tokenizer, vocabulary table, position limit, the pack-length multiple its
        attention backend needs and the modality tokenizer specs its backbone was trained with;
        check the stage's data against them and return what the model needs of the data."""
        merged = self.check_tokenizers(table, specs)
        self.pad = math.lcm(self.pad_to_multiple_of, pad_multiple)
        length = -(-self.context_length // self.pad) * self.pad
        if max_positions is not None and length > max_positions:
            raise MioUserError(f"data.context_length {self.context_length} (padded to {length}) exceeds the backbone "
                             f"{self.backbone}'s max_position_embeddings {max_positions}")
        self.tokenizer, self.table = tokenizer, table
        self.report = DataReport([d.path for d in self.datasets], self.max_error_fraction, stage_dir)
        return DataLink(pack=self.pack, specs=merged, report=self.report, first_batch=self.first_batch)

    def check_tokenizers(self, table: VocabTable, inherited: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The stage's data must speak the model's vocabulary: codebook sizes and speech layers of
        the tokenizers the data was prepared with equal the table's, and a modality the backbone
        was trained on keeps the tokenizer it was trained with. Returns the specs the stage's
        output records: the inherited ones and the data's, with their content embedded."""
        merged = dict(inherited)
        for kind, spec in self.tokenizer_specs().items():
            if kind in inherited and inherited[kind].get("sha256") != spec.get("sha256"):
                raise MioUserError(f"the {kind} tokenizer of this stage's data ({spec['path']}) differs from the one "
                                 f"the backbone {self.backbone} was trained with ({inherited[kind].get('path')})")
            for field, size in tokenizer_vocab_sizes(kind, spec).items():
                if getattr(table, field) != size:
                    raise MioUserError(f"vocabulary table mismatch: the {kind} tokenizer of this stage's data "
                                     f"({spec['path']}) needs {field} {size}, the table of the backbone "
                                     f"{self.backbone} has {getattr(table, field)}")
            merged[kind] = _embed_spec(spec)
        return merged

    def _read_vocabulary(self) -> None:
        """Alone (no model connected): the backbone folder's tokenizer and table."""
        self.tokenizer = AutoTokenizer.from_pretrained(self.backbone, local_files_only=True)
        self.table = folder_table(self.backbone, self.tokenizer, extend=self.extend_vocab,
                                  locations=self.location_tokens)
        if self.extend_vocab and not is_extended(self.tokenizer):  # a text-only backbone's: as the model's gets them
            extend_tokenizer(self.tokenizer, self.table)

    # --- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.mixture is not None:
            return
        if self.table is None:
            self._read_vocabulary()
        world = self.trainer.world_size if self.trainer is not None else 1
        self.rows = self.batch_size * world
        for d in self.datasets:
            self.dataset_folders(d)  # a glob matching nothing fails here, not in a worker
        train_shards, val_specs, val_shards = self.split()
        if val_specs and self.trainer is not None and not isinstance(self.trainer.val_check_interval, int):
            raise MioUserError("validation data is set (data.val_fraction / data.val_datasets) but "
                             "trainer.val_check_interval is not a number of training batches: the training stream "
                             "has no epochs, so set e.g. trainer.val_check_interval: 500 and "
                             "trainer.check_val_every_n_epoch: null")
        settings = (self.tokenizer, self.table, self.context_length, self.buffer_size, self.pad, self.seed,
                    self.balance, self.shuffle_buffer)
        self.mixture = Mixture(self.datasets, self.root, *settings, shards=train_shards, pack=self.pack)
        if val_specs:
            self.val_mixture = Mixture(val_specs, self.root, *settings, shards=val_shards, pack=self.pack)
        if self.report is None:  # alone: the report goes to the trainer's folder
            out_dir = self.trainer.default_root_dir if self.trainer is not None else "."
            self.report = DataReport([d.path for d in self.datasets], self.max_error_fraction, out_dir)

    def split(self) -> tuple[list[list[str]] | None, list[DatasetSpec], list[list[str]] | None]:
        """(training shards per dataset, validation datasets, their shards): with ``val_fraction``,
        whole shards held out of every dataset that has more than one (a one-shard dataset trains
        whole, and is named on stderr); else all shards, and ``val_datasets``."""
        if not self.val_fraction:
            return None, self.val_datasets, None
        train, val_specs, held, whole = [], [], [], []
        for spec in self.datasets:
            shards = list_shards(Path(self.root) / spec.path)
            if len(shards) == 1:
                train.append(shards)
                whole.append(spec.path)
                continue
            kept, out = hold_out(shards, self.val_fraction, self.seed, spec.path)
            train.append(kept)
            val_specs.append(replace(spec, cond_dropout={}))  # validation keeps every condition
            held.append(out)
        if whole and (self.trainer is None or self.trainer.is_global_zero):
            what = "no validation: every dataset" if not val_specs else ", ".join(whole)
            info(f"data.val_fraction: {what} (one shard each) trains whole and is not validated; prepare "
                 f"with a smaller shard_size to hold shards out")
        return train, val_specs, held

    def train_dataloader(self) -> RankBatches:
        assert self.mixture is not None, "setup() first"
        rank = self.trainer.global_rank if self.trainer is not None else 0
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        step = self.trainer.global_step if self.trainer is not None else 0  # restored before the loader is made
        if self.skip is not None and self.skip.batches and step == self.skip.at_step:
            self.consumed += self.skip.batches * accumulate  # a global batch: `accumulate` micro-batches per rank
            if rank == 0:
                info(f"data.skip: skipping global batches {step + 1}-{step + self.skip.batches} (at step {step})")
        rows = RankRows(self.mixture, first=rank * self.batch_size, count=self.batch_size, streams=self.rows,
                        skip=self.consumed)
        return RankBatches(rows, accumulate=accumulate, num_workers=self.num_workers)

    def first_batch(self) -> dict[str, Any]:
        """Rank 0's first micro-batch of the stage (from the start, whatever the data position)."""
        if self.mixture is None:
            self.setup("fit")
        assert self.mixture is not None
        rows = RankRows(self.mixture, first=0, count=self.batch_size, streams=self.rows)
        return next(iter(RankBatches(rows)))

    def val_dataloader(self) -> ValBatches | Iterator[Any]:
        """This rank's share of the validation packs (none without validation data)."""
        if self.val_mixture is None:
            return iter(())  # nothing to validate (an empty list would make Lightning warn)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return self.val_batches(rank, world)

    def val_batches(self, rank: int, world: int) -> ValBatches:
        """Rank ``rank`` of ``world``'s micro-batches of every validation pass (setup() first)."""
        mixture = self.val_mixture
        assert mixture is not None, "setup() first, with data.val_datasets or data.val_fraction"
        return ValBatches(lambda: (row.pack for row in mixture.rows(ReaderSlot())), self.val_packs, self.batch_size,
                          rank, world, mixture.pad_id)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counted as the batch enters a training step (the loader prefetches ahead of that).
        if self.trainer is not None and self.trainer.training:
            self.consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.consumed, **self._order()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._order().items():
            if state.get(key) != value:
                raise MioUserError(f"cannot resume to the sample: the checkpoint's data {key} is {state.get(key)!r}, "
                                 f"this run's is {value!r} (the global batch is data.batch_size x devices x nodes)")
        self.consumed = int(state["micro_batches"])

    def _order(self) -> dict[str, Any]:
        """What fixes the global sample order: resuming needs all of it unchanged."""
        order = {"rows": self.rows, "seed": self.seed, "context_length": self.context_length,
                 "buffer_size": self.buffer_size, "shuffle_buffer": self.shuffle_buffer, "balance": self.balance,
                 "datasets": [asdict(d) for d in self.datasets]}
        if self.val_fraction:  # it chooses the shards training reads
            order["val_fraction"] = self.val_fraction
        if not self.pack:  # one sample per row: other rows
            order["pack"] = False
        return order


def _embed_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Keep the spec's content beside its path, so a model folder decodes on another machine."""
    if "content" in spec:
        return spec
    return {**spec, "content": yaml.safe_load(Path(spec["path"]).read_text())}


def _spec_content(spec: dict[str, Any]) -> dict[str, Any] | None:
    if "content" in spec:
        return spec["content"]
    path = Path(spec.get("path", ""))
    return yaml.safe_load(path.read_text()) if path.is_file() else None  # prepared elsewhere: unknown


def tokenizer_vocab_sizes(kind: str, spec: dict[str, Any]) -> dict[str, int]:
    """The vocabulary-table fields a modality tokenizer spec fixes (those it states)."""
    content = _spec_content(spec)
    if content is None:
        return {}
    model = content.get("model") or {}
    if kind == "video" and isinstance(content.get("image"), str):
        image = Path(spec.get("path", "")).parent / content["image"]
        return tokenizer_vocab_sizes("image", {"path": str(image)})
    sizes = {}
    if kind == "image" and "codebook_size" in model:
        sizes["image_codebook_size"] = int(model["codebook_size"])
    if kind == "speech":
        if "codebook_size" in model:
            sizes["speech_codebook_size"] = int(model["codebook_size"])
        if "num_layers" in content:
            sizes["speech_layers"] = int(content["num_layers"])
    return sizes
