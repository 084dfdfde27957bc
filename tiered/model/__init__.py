"""The math: one decoder for every MoE family, over an ExpertProvider (store/provider.py). Imports only from
layout/, store/ and kernels/."""
