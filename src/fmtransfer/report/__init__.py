"""Report stage: run regimes x seeds x shots side by side and write the evaluation report (reads regime results)."""
