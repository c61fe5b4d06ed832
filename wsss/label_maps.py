"""What a label map holds besides class indices. Every layer reads and writes the same maps (the
seeds and pseudo-masks, the segmenter's loss, the scores), so the value lives here, in a module
that imports nothing."""

IGNORE_INDEX = 255
"""Pixels no loss and no score counts: uncertain pseudo-mask pixels, VOC's void border."""
