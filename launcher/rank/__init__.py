"""What runs on the ranks: the worker each rank starts in, the training loop (engine), its monitor, the
mapping of a run directory onto components (artifacts) and the distill stage's helpers. Never imports the
launching process's side, launcher/driver/ (docs/architecture.md, Code layout)."""
