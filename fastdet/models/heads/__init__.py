"""Detection heads: the RPN and the RoI box / mask heads of the two-stage detectors, and the dense heads of the
one-stage detectors (RetinaNet, SSD / SSDlite, YOLO, FCOS, EfficientDet), each with its head-specific assignment,
loss and selection code."""
