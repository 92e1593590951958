"""Baselines the engine is checked and timed against (reference MeZO on transformers + PEFT)."""
