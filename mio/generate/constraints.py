"""Modality-constrained decoding: a logits processor with a per-row state machine.

Outside media: text tokens or a media start token. Inside ``<image>``: image codes only,
exactly ``tokens_per_image`` of them, then ``</image>``. Inside output ``<spch>``: the speech
layers in order, each exactly as long as the first, then ``</spch>``. A video is consecutive
image blocks, so an image block that opens right after ``</image>`` is a video frame.

The state is derived from each row's ids on every call, so it is right under beam search
(whose rows are reordered between steps) and with the KV cache. Deriving it costs a few
vectorised numpy passes over the row; the allowed sets are a handful of vocabulary masks
built once per vocabulary size and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

from mio.vocab import VocabTable

TEXT, IMAGE, VIDEO, SPEECH = "text", "image", "video", "speech"


@dataclass(frozen=True)
class BlockState:
    """Where a row stands: outside media, or inside an open block and how far into it."""

    kind: str  # TEXT, IMAGE or SPEECH
    start: int = -1  # index of the open block's begin token; -1 outside media
    count: int = 0  # image: codes so far; speech: codes of the current layer so far
    layer: int = -1  # speech: layer of the last code (-1 before the first)
    first_layer_len: int = 0  # speech: codes of layer 0
    video_frame: bool = False  # image: the block opens right after a closed image block

    @property
    def mode(self) -> str:
        """The decoding settings this row's next token uses: text, image, video or speech."""
        if self.kind == IMAGE and self.video_frame:
            return VIDEO
        return self.kind


class ModalityConstraint(LogitsProcessor):
    """Masks every token the grammar of interleaved sequences forbids next (HF LogitsProcessor)."""

    def __init__(self, table: VocabTable, tokens_per_image: int = 32, max_speech_frames: int = 750,
                 allow_image: bool = True, allow_speech: bool = True) -> None:
        if tokens_per_image < 1 or max_speech_frames < 1:
            raise ValueError(f"tokens_per_image ({tokens_per_image}) and max_speech_frames ({max_speech_frames}) "
                             "must be positive")
        self.table = table
        self.tokens_per_image = tokens_per_image
        self.max_speech_frames = max_speech_frames
        self.allow_image, self.allow_speech = allow_image, allow_speech
        self._specials = np.array([table.image_begin, table.image_end, table.speech_begin, table.speech_end])
        self._blocked: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    # --- state ---------------------------------------------------------------------------
    def state(self, row: np.ndarray) -> BlockState:
        """One row of ids (1-D) -> its state after the last token."""
        t = self.table
        row = np.asarray(row)
        marks = np.flatnonzero((row == t.image_begin) | (row == t.image_end)
                               | (row == t.speech_begin) | (row == t.speech_end))
        if marks.size == 0:
            return BlockState(TEXT)
        start = int(marks[-1])
        opener, body = row[start], row[start + 1:]
        # A begin token followed by anything but its codes was a literal mention in text
        # (MIO's prompts say "Start with <spch>."), not an open block.
        if opener == t.image_begin and t.is_image(body).all():
            video = start > 0 and row[start - 1] == t.image_end
            return BlockState(IMAGE, start, count=len(body), video_frame=bool(video))
        if opener == t.speech_begin and t.is_speech(body).all():
            if body.size == 0:
                return BlockState(SPEECH, start)
            layers = (body - t.speech_start) // t.speech_codebook_size  # (n,) non-decreasing
            counts = np.bincount(layers, minlength=t.speech_layers)
            layer = int(layers[-1])
            return BlockState(SPEECH, start, count=int(counts[layer]), layer=layer, first_layer_len=int(counts[0]))
        return BlockState(TEXT)

    def allowed_key(self, s: BlockState) -> str:
        """The name of the allowed set that follows state ``s`` (see :meth:`_build_blocked`)."""
        if s.kind == TEXT:
            return "outside"
        if s.kind == IMAGE:
            return "image" if s.count < self.tokens_per_image else "image_end"
        last = self.table.speech_layers - 1
        if s.layer < 0:
            return "layer0"
        if s.layer == 0:  # the model chooses the first layer's length, up to the limit
            if s.first_layer_len >= self.max_speech_frames:
                return "after_layer0"
            return "layer0_or_next"
        if s.count < s.first_layer_len:
            return f"layer{s.layer}"
        return "speech_end" if s.layer == last else f"layer{s.layer + 1}"

    # --- masks ---------------------------------------------------------------------------
    def _build_blocked(self, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        """(V,) bool masks of the tokens each state forbids."""
        t = self.table
        ids = torch.arange(vocab, device=device)
        outside = ids < t.text_size
        if self.allow_image:
            outside |= ids == t.image_begin
        if self.allow_speech:
            outside |= ids == t.speech_begin
        layers = [(ids >= t.speech_start + k * t.speech_codebook_size) & (ids < t.speech_start + (k + 1) * t.speech_codebook_size)
                  for k in range(t.speech_layers)]
        speech_end = ids == t.speech_end
        after_layer0 = layers[1] if t.speech_layers > 1 else speech_end
        allowed = {"outside": outside, "image": (ids >= t.image_start) & (ids < t.image_end_id),
                   "image_end": ids == t.image_end, "speech_end": speech_end,
                   "after_layer0": after_layer0, "layer0_or_next": layers[0] | after_layer0}
        allowed.update({f"layer{k}": m for k, m in enumerate(layers)})
        return {k: ~m for k, m in allowed.items()}

    def blocked_masks(self, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
        key = (vocab, str(device))
        if key not in self._blocked:
            self._blocked[key] = self._build_blocked(vocab, device)
        return self._blocked[key]

    def keys(self, input_ids: torch.Tensor) -> list[str]:
        rows = input_ids.detach().cpu().numpy()
        return [self.allowed_key(self.state(r)) for r in rows]

    def allowed(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """(B, L) ids so far -> (B, V) bool of tokens allowed next."""
        return ~self.blocked(input_ids, vocab, input_ids.device)

    def blocked(self, input_ids: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
        masks = self.blocked_masks(vocab, device)
        keys = self.keys(input_ids)
        if len(keys) == 1:
            return masks[keys[0]][None]  # (1, V)
        return torch.stack([masks[k] for k in keys])  # (B, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        blocked = self.blocked(input_ids, scores.shape[-1], scores.device)
        return scores.masked_fill(blocked, float("-inf"))
