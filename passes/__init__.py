"""hogc's rewrite passes: named pure functions IR -> IR (importable as ``hogc.passes``)."""
