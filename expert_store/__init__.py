"""The expert store (sharded on-disk checkpoints, experts addressable one by one) and the runtime
that holds a fixed number of expert slots per MoE layer on the device."""
