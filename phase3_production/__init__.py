"""Phase 3: phase 2 plus rate limits, a dashboard, a result cache and metrics."""
