"""``kd-bench``: side-by-side timings of distillation against plain and hand-written training."""
