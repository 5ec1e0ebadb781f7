"""Reward models: context-aware preference modelling (`carm.py`, arXiv 2407.14916)."""
