"""Per-example engines: each fast path beside the slow per-example loop."""
