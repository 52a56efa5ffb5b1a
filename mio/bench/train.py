"""`mio bench train`: real tokens per second of `mio fit` against a bare PyTorch loop doing the same
forward + backward + optimizer step on the same packed batches (the floor), measured in one run.

Both train the tiny backbone (``TinyLlamaConfig()``, extended with mio's tokens) on synthetic
prepared datasets of the stage-I mixture, from the same weights and on the same batches: the bare
loop's batches come from the stage's own DataModule, read before its clock starts, so the floor
has no data cost at all. `mio fit` pays for everything a stage does: reading, rendering and packing
in the training process, Lightning's loop, the per-step figures and logging.

``overhead_vs_bare_loop`` = 1 - fit tokens/s / bare tokens/s (goal: at most 0.10), on one CPU
thread and in process CPU seconds: on a shared machine the CPU time a run takes for its tokens is
what it costs, while its wall time also counts the other processes (the wall-clock rates are
reported beside it). Each side runs ``repeats`` times, alternating, and keeps its best
steady-state rate (after ``warmup`` steps).

``stability_overhead`` = 1 - fit tokens/s / fit tokens/s without the monitors and the guard
(``model.monitors: false``, ``model.guard.enabled: false``; goal: at most 0.02): the gradient norm,
the logit figures, and the guard's one device read per optimizer step. Its runs alternate with the
others in the same process; the best of each side counts.

``validation_cost_share_at_1pct``: what validating on 1% of a stage's tokens costs, as a share of
the stage's time (goal: at most 0.02). One more `mio fit` run validates once on ``val_packs``
packs after its last step; the seconds per validated token (a first pass, which also reads,
renders and packs its packs) over the seconds per trained token of the same run, times 0.01.

Where a GPU is present, the same is measured in wall time for a 1B-class Llama with flash
attention (varlen over the packs) in bf16 at context 2800, with MFU (target: >= 0.45 on an H100),
and once more under FSDP2 (mio/train/sharding.py) on that GPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mio.assets import STAGES
from mio.bench.data import WORDS, write_synthetic
from mio.data.reading import DatasetSpec
from mio.model.attention import hf_attn_implementation, packed_attention_kwargs
from mio.model.backbone import TinyLlamaConfig, build_tiny_backbone, load_backbone
from mio.train.flops import FlopCounts, peak_flops
from mio.vocab import IGNORE_INDEX

STAGE = STAGES / "tiny" / "1_alignment.yaml"
MIXTURE = {"image_text": 12, "text": 2, "speech_text": 2}  # stage I
ONE_B = TinyLlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, text_vocab_size=32000)  # TinyLlama-1.1B's shape


class WallCpuClock:
    """Wall and process CPU seconds since ``start()``."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> dict[str, float]:
        return {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu}


class Stopwatch(L.Callback):
    """Real tokens and seconds of the steps after ``skip``; written to ``<default_root_dir>/stopwatch.json``."""

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.tokens = 0
        self.clock = WallCpuClock()
        self.mfu: list[float] = []
        self.val_seconds = 0.0  # validation inside the timed window
        self.val_tokens = 0
        self._val_start = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._val_start = time.process_time() if pl_module.device.type == "cpu" else time.perf_counter()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,  # noqa: ANN001
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            scored = (batch["labels"] != IGNORE_INDEX).any(1)  # (B,) rows with something to score (not the padding rows)
            self.val_tokens += int((batch["document_ids"][scored] >= 0).sum())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        if not trainer.sanity_checking:
            now = time.process_time() if pl_module.device.type == "cpu" else time.perf_counter()
            self.val_seconds += now - self._val_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        if trainer.global_step == self.skip:
            self.clock.start()
        elif trainer.global_step > self.skip:
            self.tokens += int((batch["document_ids"] >= 0).sum())
            if "train/mfu" in trainer.callback_metrics:
                self.mfu.append(float(trainer.callback_metrics["train/mfu"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = {"tokens": self.tokens, "seconds": self.clock.seconds(),
                  "mfu": sum(self.mfu) / len(self.mfu) if self.mfu else None,
                  "val_seconds": self.val_seconds, "val_tokens": self.val_tokens}
        (Path(trainer.default_root_dir) / "stopwatch.json").write_text(json.dumps(result))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_data(root: Path, samples: int) -> Path:
    for name in MIXTURE:
        write_synthetic(root / name, name, samples, shard_size=samples)
        (root / name / "manifest.json").write_text(json.dumps({"data_type": name, "tokenizers": {}}))
    return root


def stage_args(base: Path, data: Path, out: Path, steps: int, warmup: int, context: int, rows: int,
               gpu: bool) -> list[str]:
    datasets = ", ".join(f"{{path: {name}, weight: {w}}}" for name, w in MIXTURE.items())
    args = ["--config", str(STAGE), f"--model.backbone={base}", f"--data.root={data}", f"--trainer.default_root_dir={out}",
            f"--trainer.max_steps={warmup + steps}", f"--data.context_length={context}", f"--data.batch_size={rows}",
            f"--data.datasets=[{datasets}]", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.callbacks+=mio.bench.train.Stopwatch",
            f"--trainer.callbacks.skip={warmup}",
            # No checkpoints: a stage's default interval (max_steps / 20) is over a thousand steps at
            # full size, while over this run's few steps it would write one every step.
            "--checkpoint.every_n_train_steps=0"]
    if gpu:
        # A 1B model at 4 x 2800 tokens fits an 80 GB GPU without recomputation (which MFU, counting
        # model FLOPs, would not credit).
        args += ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--model.attn_backend=flash"]
    return args


def run_fit(args: list[str], out: Path) -> tuple[dict[str, float], float | None]:
    """Tokens per second by clock, and the mean MFU where the device's peak is known."""
    from mio.train.cli import fit

    fit(args)
    result = json.loads((out / "stopwatch.json").read_text())
    return {k: result["tokens"] / s for k, s in result["seconds"].items()}, result["mfu"]


def validation_cost(base: Path, data: Path, out: Path, steps: int, warmup: int, context: int, rows: int,
                    gpu: bool, val_packs: int) -> dict[str, Any]:
    """A `mio fit` run that validates once, after its last step (the pass reads its packs too)."""
    from mio.train.cli import fit

    datasets = ", ".join(f"{{path: {name}, weight: {w}}}" for name, w in MIXTURE.items())
    every = warmup + steps
    fit(stage_args(base, data, out, steps, warmup, context, rows, gpu) + [
        "--data.val_fraction=0", f"--data.val_datasets=[{datasets}]", f"--data.val_packs={val_packs}",
        f"--trainer.val_check_interval={every}",
        "--trainer.check_val_every_n_epoch=null", "--trainer.num_sanity_val_steps=0"])
    r = json.loads((out / "stopwatch.json").read_text())
    clock = "wall" if gpu else "cpu"
    train_seconds = r["seconds"][clock] - r["val_seconds"]
    per_val_token, per_train_token = r["val_seconds"] / r["val_tokens"], train_seconds / r["tokens"]
    return {"validation_packs_per_pass": val_packs, "validation_tokens": r["val_tokens"],
            "validation_seconds_per_token_over_training": round(per_val_token / per_train_token, 4),
            "validation_cost_share_at_1pct": round(0.01 * per_val_token / per_train_token, 5),
            "target_validation_cost_share_at_1pct_max": 0.02}


def fit_batches(base: Path, data: Path, n: int, context: int, rows: int) -> list[dict[str, Any]]:
    """The first ``n`` micro-batches the stage's DataModule gives (the same ones `mio fit` trains on)."""
    from mio.train.data import MioDataModule

    dm = MioDataModule([DatasetSpec(name, w) for name, w in MIXTURE.items()], root=str(data),
                       context_length=context, batch_size=rows, backbone=str(base), extend_vocab=True)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def bare_loop(base: Path, batches: list[dict[str, Any]], warmup: int, device: torch.device, backend: str,
              settings: dict[str, Any]) -> dict[str, float]:
    """Real tokens per second of a plain loop: forward, loss on supervised positions, backward,
    clipping, AdamW and the cosine schedule; nothing else."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    L.seed_everything(0, verbose=False)
    model, _, _ = load_backbone(base, attn_implementation=hf_attn_implementation(backend), extend=True)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings["lr"], betas=(0.9, 0.95))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, math.ceil(0.03 * len(batches)), len(batches),
                                                        min_lr_rate=settings["min_lr_ratio"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    tokens, clock = 0, WallCpuClock()
    for i, cpu_batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            clock.start()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}
        with autocast:
            hidden = model.get_decoder()(input_ids=batch["input_ids"], use_cache=False,
                                         **packed_attention_kwargs(backend, batch)).last_hidden_state
            targets = batch["labels"][:, 1:]
            supervised = targets != IGNORE_INDEX
            logits = model.get_output_embeddings()(hidden[:, :-1][supervised])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[supervised])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            tokens += int((cpu_batch["document_ids"] >= 0).sum())
    _sync(device)
    return {k: tokens / s for k, s in clock.seconds().items()}


def measure(base: Path, data: Path, runs: Path, steps: int, warmup: int, context: int, rows: int, repeats: int,
            gpu: bool) -> dict[str, Any]:
    import yaml

    settings = yaml.safe_load(STAGE.read_text())["model"]
    device = torch.device("cuda" if gpu else "cpu")
    backend = "flash" if gpu else "sdpa"
    batches = fit_batches(base, data, warmup + steps, context, rows)
    bare, fit, unguarded, mfu = [], [], [], []
    for r in range(repeats):
        bare.append(bare_loop(base, batches, warmup, device, backend, settings))
        out = runs / f"fit{r}"
        rate, step_mfu = run_fit(stage_args(base, data, out, steps, warmup, context, rows, gpu), out)
        fit.append(rate)
        mfu.append(step_mfu)
        out = runs / f"fit_unguarded{r}"
        unguarded.append(run_fit(stage_args(base, data, out, steps, warmup, context, rows, gpu)
                                 + ["--model.monitors=false", "--model.guard.enabled=false"], out)[0])
    clock = "wall" if gpu else "cpu"
    best_bare, best_fit = max(b[clock] for b in bare), max(f[clock] for f in fit)
    best_unguarded = max(u[clock] for u in unguarded)
    model, _, _ = load_backbone(base, extend=True)
    counts = FlopCounts.of(model)
    result = {
        "clock": "wall seconds" if gpu else "process CPU seconds",
        "fit_tokens_per_s": round(best_fit, 1),
        "bare_loop_tokens_per_s": round(best_bare, 1),
        "overhead_vs_bare_loop": round(1 - best_fit / best_bare, 4),
        "fit_runs_tokens_per_s": [{k: round(v, 1) for k, v in x.items()} for x in fit],
        "bare_runs_tokens_per_s": [{k: round(v, 1) for k, v in x.items()} for x in bare],
        "stability_overhead": round(1 - best_fit / best_unguarded, 4),
        "target_stability_overhead_max": 0.02,
        "unguarded_runs_tokens_per_s": [{k: round(v, 1) for k, v in x.items()} for x in unguarded],
        "parameters": sum(p.numel() for p in model.parameters()),
        "flop_counts": counts.__dict__,
        "tokens_per_step": int(sum(int((b["document_ids"] >= 0).sum()) for b in batches) / len(batches)),
    }
    result.update(validation_cost(base, data, runs / "val", steps, warmup, context, rows, gpu, val_packs=2 * rows))
    peak = peak_flops(device, "bf16-mixed" if gpu else "32-true")
    if peak:
        result["mfu"] = max(m for m in mfu if m is not None) if any(m is not None for m in mfu) else None
    if gpu:  # the same stage sharded with FSDP2 on this one GPU (bf16 compute, fp32 master weights)
        out = runs / "fit_fsdp2"
        rate, step_mfu = run_fit([*stage_args(base, data, out, steps, warmup, context, rows, gpu),
                                  "--trainer.strategy=mio.train.sharding.FSDP2Strategy"], out)
        result["fsdp2"] = {"fit_tokens_per_s": round(rate["wall"], 1), "mfu": step_mfu}
    return result


def bench_train(steps: int = 20, warmup: int = 3, context_length: int = 1024, batch_size: int = 2,
                repeats: int = 2, samples: int = 400, cpu: bool = True) -> dict[str, Any]:
    """``cpu`` false: only the GPU's figures (`make gpu-check`)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the tokenizer's thread pool stays off
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench(steps, warmup, context_length, batch_size, repeats, samples, cpu)
    finally:
        torch.set_num_threads(threads)


def _bench(steps: int, warmup: int, context_length: int, batch_size: int, repeats: int,
           samples: int, cpu: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mio-bench-train-") as tmp:
        root = Path(tmp)
        data = write_data(root / "data", samples)
        rng = random.Random(0)
        corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(500)]
        base = build_tiny_backbone(corpus, TinyLlamaConfig(), root / "base")
        result: dict[str, Any] = {"bench": "train", "steps": steps, "warmup_steps": warmup}
        if cpu:
            result.update({
                "device": "cpu", "threads": torch.get_num_threads(), "model": "TinyLlamaConfig()",
                "context_length": context_length, "batch_size": batch_size,
                **measure(base, data, root / "runs", steps, warmup, context_length, batch_size, repeats, gpu=False),
            })
        if torch.cuda.is_available():
            big = build_tiny_backbone(corpus, ONE_B, root / "base_1b")
            result["gpu_1b"] = {"device": torch.cuda.get_device_name(), "context_length": 2800, "batch_size": 4,
                                **measure(big, data, root / "runs_1b", steps, warmup, 2800, 4, repeats, gpu=True)}
    return result
