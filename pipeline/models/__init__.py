"""Restorers (pixel and latent diffusion), their loading, sampling and LoRA, the learned reward model, the MLflow pyfunc."""
