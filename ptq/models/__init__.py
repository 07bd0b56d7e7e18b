"""Model sources: Hugging Face folders, GGUF files and the embedded default model."""
