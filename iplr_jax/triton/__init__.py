"""The Pallas kernels on the Triton backend (implementation "pallas" on a GPU, "interpret" on
CPU): forward and backward of the chunked form and of the fused recurrence, with their configs."""
