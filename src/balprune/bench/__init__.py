"""Benchmark reports (JSON schema ``balprune.bench/1``) and their comparison; timing lives on the GPU side."""
