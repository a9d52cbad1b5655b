"""Methods that use a small set of unlabeled calibration images (never test images)."""
