"""The oracles, in plain jnp: the step-by-step recurrence (`naive`) and the chunked form."""
