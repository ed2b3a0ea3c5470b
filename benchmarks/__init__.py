"""Side-by-side benchmarks of stickylb against the direct backend, HAProxy and nginx."""
