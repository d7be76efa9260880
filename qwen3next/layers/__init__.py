"""nn.Modules of the Qwen3-Next decoder: norms, rotary, gated attention, gated DeltaNet, MoE, MLP.
Parameter names are the checkpoint's names; all tensor maths goes through `kernels.ops`."""
