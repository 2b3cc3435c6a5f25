"""Downstream cell segmentation on a (pretrained) dinocell backbone: ``dinocell segment fit|predict|evaluate``.

A light neck and upsampling decoder turn the backbone's patch tokens into a per-pixel normalised
distance map and a foreground map (as DINOCell / SAMCell); sliding-window inference plus peaks and
watershed give instance labels; AP metrics follow the cellpose / StarDist definition.
"""
