"""Interactive Segment Anything: checkpoint lookup (weights), encoder/decoder engine (engine), embedding cache and
store, mask formats (masks) and the simulated annotator (annotator). Import the submodules; this package imports
nothing heavy, so a process that only needs mask helpers or the annotator does not load torch."""
