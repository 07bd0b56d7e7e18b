"""ptq.exporters package."""
