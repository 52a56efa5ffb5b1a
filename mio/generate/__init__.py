"""mio.generate: modality-constrained decoding, the generation loop, and detokenizers.

    from mio.generate import Generator, MediaFile
    gen = Generator("runs/demo/model")
    out = gen.generate(["What is this?", MediaFile("image", Path("cat.jpg"))])
    gen.write(out, "answers/cat")

constraints  the logits processor with the block grammar (a transformers LogitsProcessor)
settings     per-modality decoding settings and the presets (paper's Table 8, MIO's release, guided)
decoding     the loop: settings switched at block boundaries, KV cache, beam search in any mode,
             classifier-free guidance inside media blocks (an unconditional row beside each sequence)
media        which tokenizers a model uses, prompt files -> codes
prompt       the prompt syntax: where a prompt's media files go ({image}, <image_placeholder_0>)
detok        codes -> images (SEED + unCLIP), speech (WAV), video (GIF)
generator    the Python API; transcript: the files it writes; cli: `mio generate`
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Generator": "mio.generate.generator",
    "Generation": "mio.generate.generator",
    "MediaFile": "mio.generate.media",
    "ModalityConstraint": "mio.generate.constraints",
    "DecodeSettings": "mio.generate.settings",
    "TABLE8": "mio.generate.settings",
    "PRESETS": "mio.generate.settings",
    "UnclipSettings": "mio.generate.detok",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Imported on use: the generator pulls in diffusers and the tokenizers, the demo only needs constraints.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
