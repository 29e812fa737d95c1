"""The C source of netsim's optional native accelerator; import it through `netsim.accel` (docs/native.md)."""
