"""Expert kernels: fast paths for the routed-expert computation (Triton kernels, grouped GEMMs), each
beside the plain torch reference it is tested against (`model.moe.experts_one_token`, a loop over experts).

Imports only from layout/ and store/ (a kernel may read a provider's slot weights); the model imports
kernels, never the other way round.
"""
