"""ptq.calibration package."""
