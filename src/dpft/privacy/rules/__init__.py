"""Per-layer rules of the clipping engine: one small module per layer family.

Each rule captures what a layer needs in the single backward pass and turns it into per-unit
squared gradient norms and the clipped per-unit gradient sum. `dpft.privacy.layers` registers them.
"""
