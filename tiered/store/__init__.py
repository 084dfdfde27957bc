"""Where expert bytes live: the options and budget, the layout on disk, host memory, reads, policies, the RAM
and VRAM tiers, and the two expert providers (resident.py: every expert in memory; cache.py: the tiers).
Imports only from layout/."""
