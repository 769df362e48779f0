"""Benchmark reports (JSON schema ``balprune.bench/2``) and their comparison; timing lives on the GPU side."""
