"""The passive store (issue 11): KV pages of decoding requests that the selection no longer needs
move to a host pool and their KV blocks go back to vLLM, so more requests fit. README, "Passive
store", has the design; `connector` is the vLLM glue, `store` the worker side, `pool` the memory
and copies, `policy` which pages go."""
