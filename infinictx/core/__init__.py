"""The core every method, learner, task and front builds on.

  session.py    the session protocol (score / absorb / generate, capabilities, learners) and the plain window
  attention.py  a Llama-family forward whose attention a method supplies layer by layer, RoPE, KV buffers
  models.py     loading a model (HF directory, GGUF, the embedded default) and the base weights' fingerprint
  registry.py   methods by name, and settings: the fields every config, learner and task is made of
  cost.py       wall time per phase, analytic FLOPs, peak memory
  errors.py     InfinictxError (one line for the user) and the finite-number check
  files.py, progress.py   atomic writes, progress bars"""
