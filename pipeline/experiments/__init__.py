"""Experiments over many pipeline runs, as DVC experiments: the RL ablation (`restorl ablate`)."""
