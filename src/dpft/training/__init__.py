"""The training recipe and what it writes: checkpoints, journal, run directory."""
