"""The lab: train small language models on real text and measure what SNOO saves (docs/lab.md)."""
