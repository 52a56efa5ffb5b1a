"""The training loss (mio/train/loss.py, what MioModule.training_step computes) gives every
supervised token of the global batch the same weight, and the training loop reads the device
back once per logged step, never per micro-batch."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_support import shared_root, tiny_args

from mio.data.packing import BestFitPacker, TokenSample, collate_packs
from mio.model.forward import supervised_positions
from mio.train.cli import fit
from mio.train.loss import micro_batch_loss, step_tokens, supervised_count, supervised_targets, token_cross_entropy
from mio.train.module import MioModule

VOCAB = 53


def random_labels(generator: torch.Generator, rows: int, length: int) -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    return labels.masked_fill(torch.rand(rows, length, generator=generator) < 0.4, -100)


def loss_of(logits: torch.Tensor, labels: torch.Tensor, step_count: torch.Tensor) -> torch.Tensor:
    """The training loss of (B, L, V) logits: at their supervised positions only, as the model's own head gives them."""
    return micro_batch_loss(token_cross_entropy(logits[supervised_positions(labels)], supervised_targets(labels)),
                            step_count)


@pytest.mark.slow
def test_the_modules_loss_equals_transformers_own(tiny_base) -> None:
    """MioModule's per-token losses (the model's own logits at the supervised positions) through
    the loss functions give transformers' own mean loss of the same rows."""
    module = MioModule(str(tiny_base), extend_vocab=True)
    module.load_weights()
    module.model.eval()
    g = torch.Generator().manual_seed(0)
    samples = [TokenSample(ids.numpy(), lab.numpy()) for ids, lab in
               zip(torch.randint(0, 300, (3, 20), generator=g), random_labels(g, 3, 20))]
    batch = collate_packs(list(BestFitPacker(20, buffer_size=1)(samples)))  # one sample per row
    with torch.no_grad():
        token_loss = module.token_losses(batch).token_loss
        ours = micro_batch_loss(token_loss, step_tokens(supervised_count(batch["labels"])))
        theirs = module.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_gradient_accumulation_and_packing_do_not_change_a_token_weight() -> None:
    """Micro-batch losses over the global count add up to the whole-batch loss, gradients included,
    however unevenly supervised the micro-batches are."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(VOCAB, VOCAB, generator=g, requires_grad=True)
    ids = torch.randint(0, VOCAB, (6, 24), generator=g)
    labels = random_labels(g, 6, 24)
    labels[4:] = -100  # a micro-batch with no supervision at all
    labels[4, 5] = 7

    whole = loss_of(weight[ids], labels, step_tokens(supervised_count(labels)))
    (whole_grad,) = torch.autograd.grad(whole, weight)

    micro = [slice(0, 1), slice(1, 4), slice(4, 6)]
    n_step = step_tokens(sum(supervised_count(labels[s]) for s in micro))
    assert n_step == (labels[:, 1:] != -100).sum()
    accumulated = sum(loss_of(weight[ids[s]], labels[s], n_step) for s in micro)
    (acc_grad,) = torch.autograd.grad(accumulated, weight)
    assert torch.allclose(accumulated, whole, atol=1e-6)
    assert torch.allclose(acc_grad, whole_grad, atol=1e-7)
    # ...and both are the plain mean over all supervised tokens.
    reference = F.cross_entropy(weight[ids][:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(whole, reference, atol=1e-6)
    # Lightning averages micro-batches and DDP ranks; `replicas` undoes exactly that.
    assert torch.allclose(micro_batch_loss(torch.ones(3), 4, replicas=6), torch.tensor(4.5))


def test_no_supervised_token_gives_zero_not_nan() -> None:
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.full((2, 5), -100)
    assert loss_of(logits, labels, step_tokens(supervised_count(labels))).item() == 0.0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        token_cross_entropy(torch.randn(2, 5, VOCAB), torch.zeros(2, dtype=torch.long))


def _count_on_rank(rank: int, world: int, port: int, results: mp.SimpleQueue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Rank r holds r+1 micro-batches with 3 supervised targets each.
        labels = torch.full((1, 6), -100)
        labels[0, 1:4] = 1
        results.put((rank, int(step_tokens(sum(supervised_count(labels) for _ in range(rank + 1))))))
    finally:
        torch.distributed.destroy_process_group()


def test_count_is_all_reduced_over_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # CPU-only gloo: forking is safe and skips re-importing torch
    results = ctx.SimpleQueue()
    ranks = [ctx.Process(target=_count_on_rank, args=(r, 2, port, results)) for r in range(2)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert dict(results.get() for _ in ranks) == {0: 9, 1: 9}  # 3 * (1 + 2) on every rank


READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy", "cpu")
# mio/train/: the step, its loss, figures, guard and data report
LOOP = ("module.py", "loss.py", "flops.py", "data.py", "guard.py")


@pytest.mark.slow
@pytest.mark.parametrize("guard", [False, True])
def test_one_device_read_per_logged_step(tmp_path_factory, tmp_path, monkeypatch, guard) -> None:
    """On a GPU, every read of a device tensor by the host stalls the stream: the training loop
    reads its figures back once per logged step, none per micro-batch (callbacks that print the
    logged figures are not counted: they read them when they print, at logged steps); the
    guard, on by default, reads its decision's two figures once per optimizer step."""
    reads: list[str] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, real=real, name=name, **kwargs):  # noqa: ANN001, ANN202
            caller = sys._getframe(1).f_code.co_filename
            if "/mio/train/" in caller and caller.endswith(LOOP):
                reads.append(f"{name} from {caller.rsplit('/', 1)[1]}:{sys._getframe(1).f_lineno}")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    root = shared_root(tmp_path_factory)
    fit(tiny_args(root, tmp_path, "--trainer.log_every_n_steps=2", "--trainer.accumulate_grad_batches=2",
                  "--data.val_fraction=0", f"--model.guard.enabled={str(guard).lower()}", steps=4))
    # Two logged steps (of 2 optimizer steps x 2 micro-batches each), the closing data report and
    # the finite-weights check before the model folder; with the guard, one more per optimizer step.
    assert len(reads) == 4 + (4 if guard else 0), reads
