"""The public ops, one module each: validation, the choice of implementation, the layout the
kernels want, and the `custom_vjp` that ties a backend's forward and backward kernels."""
