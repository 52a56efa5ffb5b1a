"""Modality-constrained decoding: a logits processor with a per-row state machine.

Outside media: text tokens or a media start token. Inside ``<image>``: image codes only,
exactly ``tokens_per_image`` of them, then ``</image>``. Inside output ``<spch>``: the speech
layers in order, each exactly as long as the first, then ``</spch>``. The state is derived
from each row's ids on every call (vectorised), so it is right under beam search, whose rows
are reordered between steps, and with the KV cache.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from mio.vocab import VocabTable


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the last True per row, -1 where none."""
    length = mask.shape[1]
    idx = length - 1 - mask.flip(1).int().argmax(1)
    return torch.where(mask.any(1), idx, torch.full_like(idx, -1))


class ModalityConstraint(LogitsProcessor):
    def __init__(self, table: VocabTable, tokens_per_image: int = 32, max_speech_frames: int = 750,
                 allow_image: bool = True, allow_speech: bool = True) -> None:
        self.table = table
        self.tokens_per_image = tokens_per_image
        self.max_speech_frames = max_speech_frames
        self.allow_image, self.allow_speech = allow_image, allow_speech

    def _masks(self, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        t = self.table
        ids = torch.arange(vocab, device=device)
        outside = ids < t.text_size
        if self.allow_image:
            outside |= ids == t.image_begin
        if self.allow_speech:
            outside |= ids == t.speech_begin
        layers = [(ids >= t.speech_start + k * t.speech_codebook_size) & (ids < t.speech_start + (k + 1) * t.speech_codebook_size)
                  for k in range(t.speech_layers)]
        return {"outside": outside, "image": (ids >= t.image_start) & (ids < t.image_end_id),
                "image_end": ids == t.image_end, "speech_end": ids == t.speech_end, "layers": torch.stack(layers)}

    def allowed(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """(B, L) ids so far -> (B, V) bool of tokens allowed next."""
        t = self.table
        m = self._masks(vocab, input_ids.device)
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        img_open = _last_index(input_ids == t.image_begin)
        img_close = _last_index(input_ids == t.image_end)
        sp_open = _last_index(input_ids == t.speech_begin)
        sp_close = _last_index(input_ids == t.speech_end)
        allowed = m["outside"].expand(B, vocab).clone()

        in_image = img_open > img_close
        if in_image.any():
            n_codes = (L - 1 - img_open).clamp(min=0)
            more = n_codes < self.tokens_per_image
            allowed[in_image] = torch.where(more[in_image, None], m["image"], m["image_end"])

        in_speech = sp_open > sp_close
        if in_speech.any():
            rows = in_speech.nonzero().flatten()
            after = pos[rows] > sp_open[rows, None]  # (R, L) tokens of the open block
            rel = input_ids[rows] - t.speech_start
            layer_of = torch.where(after & (rel >= 0), rel // t.speech_codebook_size, torch.full_like(rel, -1))
            counts = torch.stack([(layer_of == k).sum(1) for k in range(t.speech_layers)], 1)  # (R, layers)
            current = torch.where(counts > 0, torch.arange(t.speech_layers, device=rows.device), -1).max(1).values
            for r, row in enumerate(rows.tolist()):
                allowed[row] = self._speech_next(counts[r], int(current[r]), m)
        return allowed

    def _speech_next(self, counts: torch.Tensor, current: int, m: dict[str, torch.Tensor]) -> torch.Tensor:
        n0 = int(counts[0])
        last = self.table.speech_layers - 1
        if current <= 0:  # the first layer: the model chooses its length, up to the limit
            if n0 == 0:
                return m["layers"][0]
            nxt = m["layers"][1] if last >= 1 else m["speech_end"]
            return nxt if n0 >= self.max_speech_frames else m["layers"][0] | nxt
        if int(counts[current]) < n0:
            return m["layers"][current]
        return m["speech_end"] if current == last else m["layers"][current + 1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed(input_ids, scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))
