"""Necks: the feature pyramid network and its extra levels (:mod:`.fpn`), YOLOv5's PAN (:mod:`.pan`), EfficientDet's
BiFPN (:mod:`.bifpn`)."""
