"""The privacy core: sampling, per-unit clipping, noise, accounting. Pure: no files, no CLI."""
