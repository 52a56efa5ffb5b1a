"""Known third-party noise kept out of mio's commands; ``mio -v`` shows everything.

Dropped: Lightning's accelerator lines ("GPU available: ...") and advertisements ("Tip: ..."),
its "Seed set to" line (the stage config records the seed) and its "stopped: max_steps reached"
line (mio's step lines and the stage's closing summary say it), transformers' notice on how resized
embeddings are initialised, its deprecation notices and its note that image processors fall back
to PIL without torchvision, the "Loading weights" / "Writing model shards" progress bars, and
deprecation warnings raised inside the dependencies (DeprecationWarning, FutureWarning), and
Lightning's advice to reduce epoch-level metrics over ranks (mio's are reduced already): nothing
a user of mio needs to act on. Everything else a dependency logs or warns shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

NOISE = re.compile("|".join((
    r"^(GPU|TPU|HPU|IPU) available:",
    r"Tip: ",
    r"^Seed set to ",
    r"^`Trainer\.fit` stopped: `max_steps=\d+` reached",  # mio's own step lines and closing summary say it
    r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",
    r"new (lm_head weights|embeddings) will be initialized",
    r" (is|are) deprecated",
    r"requires torchvision \(not installed\); falling back",  # transformers' image processors work without it
)))
SYNC_DIST_ADVICE = r"It is recommended to use `self\.log\('[^']*', \.\.\., sync_dist=True\)`"
# The loggers that emit those messages (a filter on a logger sees the records it creates; these
# are set up before the libraries are imported, which would be slow for commands not needing them).
EMITTERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
            "lightning.fabric.utilities.seed", "transformers.modeling_utils", "transformers.utils.generic",
            "transformers.utils.import_utils")


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOISE.search(record.getMessage()) is None


def quiet() -> None:
    """Filter the known noise for the rest of this process (and the processes it starts)."""
    noise = NoiseFilter()
    for name in EMITTERS:
        logging.getLogger(name).addFilter(noise)
    # Read by huggingface_hub when transformers is imported: its progress bars stay off.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers.utils.logging" in sys.modules:  # already imported (mio used as a library)
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # Lightning's advice for epoch-level metrics on several ranks: mio's validation figures are summed
    # over ranks before they are logged (MioModule.on_validation_epoch_end).
    warnings.filterwarnings("ignore", message=SYNC_DIST_ADVICE)
