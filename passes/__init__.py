"""ptq.passes package."""
