"""Triton kernels, one op per file under the op's stem: @triton.jit code and its launch
configuration only. ops/<op>.py imports its module lazily, when a kernel is launched, so
`import ddpm_fast` works without triton; nothing here imports ops/ (DESIGN §4)."""
