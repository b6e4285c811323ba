"""Rewards: the learned reward's training and checks, pyiqa scorers, hack controls, realism."""
