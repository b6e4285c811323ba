"""The RL loop and its parts (objectives, step credit, weighting, regularisers), picked by config."""
