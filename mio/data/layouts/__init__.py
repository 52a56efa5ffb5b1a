"""The layouts mio reads rows in: the registry (:mod:`mio.data.layouts.registry`) and one module
per layout, each registering its reader when imported here. To add a layout, write its module
(a function decorated with ``register_layout(NAME, DATA_TYPE, DEFAULT_FIELDS)``) and import it below."""

from mio.data.layouts import grounding, llava, mmc4, obelics, segments  # noqa: F401  (each registers its reader)
from mio.data.layouts.registry import (
                                       LAYOUTS,
                                       Item,
                                       Layout,
                                       RowDraft,
                                       RowFields,
                                       draft_row,
                                       layout_of,
                                       media_refs,
                                       register_layout,
)

__all__ = ["LAYOUTS", "Item", "RowDraft", "Layout", "RowFields", "draft_row", "layout_of", "media_refs",
           "register_layout"]
