"""Routing research and prefetch: traces, predictors, the prefetcher and eviction scores, the tier simulator,
replayed routing. Imports from layout/, store/, kernels/ and model/; never from decode/, engine.py or cli/."""
