"""Checkpoints: saving and loading (:mod:`engine.checkpoint.dist`), what a run takes from one it loads
(:mod:`engine.checkpoint.inherit`)."""

# the forms a user may name a checkpoint in (engine.checkpoint.dist.locate); here so help texts need no torch
CHECKPOINT_FORMS = ("a run directory, its checkpoints directory (their 'best' checkpoint, else the latest), "
                    "a step_* directory, or a 'best' or 'latest' pointer file in a checkpoints directory")
